"""anchorlearn.models."""
