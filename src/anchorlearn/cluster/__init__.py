"""anchorlearn.cluster."""
