"""anchorlearn.metrics."""
