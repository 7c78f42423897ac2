"""anchorlearn.viz."""
