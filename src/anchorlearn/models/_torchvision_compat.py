"""Importing torchvision beside a torch build it was not compiled for.

PyPI's torchvision wheels carry compiled operators (``torchvision._C``) built against
PyPI's CUDA torch. Beside the CPU build of torch their library does not load, and the import
then stops in ``torchvision._meta_registrations``, which registers fake kernels for the
operators ``torchvision::nms`` and ``torchvision::qnms`` and fails with
``RuntimeError: operator torchvision::nms does not exist``. Everything else in torchvision
is Python. :func:`import_torchvision` defines the schemas of those two operators (without
kernels) when, and only when, the import fails with exactly that error, and imports again:
torchvision's Python code (transforms, the model definitions timm imports) then works,
while its compiled operators (``nms``, ``roi_align``, image decoding) stay unavailable and
raise if called.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import torch

__all__ = ["import_torchvision", "torchvision_importable_if_installed"]

_MISSING_OPERATOR = "operator torchvision::nms does not exist"
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
# the definitions live as long as this object does
_library: torch.library.Library | None = None


def import_torchvision() -> ModuleType:
    """``import torchvision``, defining the ``nms``/``qnms`` schemas first if it needs them.

    Raises:
        ImportError: torchvision is not installed.
        RuntimeError: the import fails for any other reason (re-raised unchanged).
    """
    global _library
    try:
        import torchvision
    except RuntimeError as error:
        if _MISSING_OPERATOR not in str(error) or _library is not None:
            raise
    else:
        return torchvision
    _library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        _library.define(schema)
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # the modules of the failed attempt
    import torchvision

    return torchvision


def torchvision_importable_if_installed() -> None:
    """:func:`import_torchvision` when torchvision is installed, so that packages importing
    it later (Lightning, torchmetrics) succeed; nothing (not even the import) otherwise."""
    if importlib.util.find_spec("torchvision") is not None:
        import_torchvision()
