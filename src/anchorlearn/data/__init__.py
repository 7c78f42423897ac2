"""anchorlearn.data."""
