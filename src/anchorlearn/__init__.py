"""anchorlearn: anchor- and prototype-based representation learning for PyTorch."""

import importlib.util as _importlib_util

__version__ = "0.1.0"

# torchmetrics and Lightning import torchvision whenever it is installed; a PyPI torchvision
# beside a CPU build of torch fails to import (see anchorlearn.models._torchvision_compat).
# Where torchvision is installed, make it importable once, before anything imports it.
if _importlib_util.find_spec("torchvision") is not None:
    from anchorlearn.models._torchvision_compat import import_torchvision as _import_torchvision

    _import_torchvision()
