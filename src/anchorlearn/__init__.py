"""anchorlearn: anchor- and prototype-based representation learning for PyTorch."""

__version__ = "0.1.0"
