"""anchorlearn.data.

Importing the package is cheap: :func:`open_segmentation` (which needs torch) is loaded on
first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["open_segmentation"]


def __getattr__(name: str) -> Any:
    if name == "open_segmentation":
        from anchorlearn.data.segmentation_sets import open_segmentation

        return open_segmentation
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
