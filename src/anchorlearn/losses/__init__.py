"""anchorlearn.losses."""
