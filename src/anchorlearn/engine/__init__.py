"""anchorlearn.engine."""
