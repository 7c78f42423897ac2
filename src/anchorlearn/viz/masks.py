"""Colour-coded segmentation masks: a default palette, colouring, PNG output and a figure of
images beside their ground truth and predictions.

Masks are integer class maps ``(H, W)`` (numpy arrays or tensors); a palette is a
``(C, 3)`` uint8 array whose row ``c`` is the RGB colour of class ``c``. Pixels equal to
``ignore_index`` take ``ignore_color``. The figure is built with matplotlib's
object-oriented API and rendered by Agg, without pyplot: no backend is switched and no
figure stays open.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

from anchorlearn._checks import check_positive_int

__all__ = ["colorize", "default_palette", "plot_segmentation_examples", "save_mask_png"]

ArrayLike = torch.Tensor | np.ndarray

# Layout of plot_segmentation_examples, in inches (saved at _DPI dots per inch).
_DPI = 100
_PANEL_HEIGHT = 2.0
_GAP = 0.1
_HEADER = 0.3
_TITLE = 0.4
_LEGEND_ROW = 0.25
_LEGEND_ENTRY_WIDTH = 1.6


def _to_numpy(values: object, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    if isinstance(values, np.ndarray):
        return values
    raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(values).__name__}")


def _integer_array(values: object, name: str, ndim: int) -> np.ndarray:
    array = _to_numpy(values, name)
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name} must hold integer class labels, got dtype {array.dtype}")
    if array.ndim != ndim:
        shape = "(H, W)" if ndim == 2 else "(N, H, W)"
        raise ValueError(f"{name} must have shape {shape}, got {array.shape}")
    return array


def _check_palette(palette: object) -> np.ndarray:
    array = _to_numpy(palette, "palette")
    if array.dtype != np.uint8:
        raise TypeError(f"palette must be uint8 RGB colours, got dtype {array.dtype}")
    if array.ndim != 2 or array.shape[1] != 3 or array.shape[0] == 0:
        raise ValueError(f"palette must have shape (C, 3) with C >= 1, got {array.shape}")
    return array


def _check_color(color: object, name: str) -> np.ndarray:
    array = np.asarray(color)
    if (
        array.shape != (3,)
        or not np.issubdtype(array.dtype, np.integer)
        or ((array < 0) | (array > 255)).any()
    ):
        raise ValueError(f"{name} must be three ints in [0, 255] (R, G, B), got {color!r}")
    return array.astype(np.uint8)


def default_palette(num_classes: int) -> np.ndarray:
    """``(num_classes, 3)`` uint8 colours of Pascal VOC's scheme: the bits of the class
    index are dealt out in turn to red, green and blue, from the most significant bit of
    each channel down.

    Deterministic, and distinct for up to ``2**24`` classes; class 0 is black, class 1
    ``(128, 0, 0)``, class 2 ``(0, 128, 0)``, class 3 ``(128, 128, 0)``, ...
    """
    from anchorlearn.data.segmentation_sets import voc_palette

    return voc_palette(check_positive_int(num_classes, "num_classes"))


def colorize(
    mask: ArrayLike,
    palette: ArrayLike,
    ignore_index: int | None = 255,
    ignore_color: Sequence[int] = (0, 0, 0),
) -> np.ndarray:
    """RGB image ``(H, W, 3)`` uint8 of the class map ``mask`` ``(H, W)``: pixel value ``c``
    takes ``palette[c]``, ``ignore_index`` takes ``ignore_color``.

    Any other value outside ``[0, C)`` is a ``ValueError``. With :func:`default_palette`
    class 0 is black like the default ``ignore_color``; pass e.g. ``(224, 224, 192)``
    (VOC's boundary colour) to tell them apart.
    """
    return _colorize(
        _integer_array(mask, "mask", 2),
        _check_palette(palette),
        ignore_index,
        _check_color(ignore_color, "ignore_color"),
        "mask",
    )


def _colorize(
    labels: np.ndarray,
    colours: np.ndarray,
    ignore_index: int | None,
    ignore_rgb: np.ndarray,
    name: str,
) -> np.ndarray:
    ignored = np.zeros(labels.shape, dtype=bool) if ignore_index is None else labels == ignore_index
    bad = ~ignored & ((labels < 0) | (labels >= len(colours)))
    if bad.any():
        allowed = f"[0, {len(colours)})" + (
            "" if ignore_index is None else f" or ignore_index={ignore_index}"
        )
        raise ValueError(
            f"{name} must lie in {allowed} (palette has {len(colours)} colours), got "
            f"{int(bad.sum())} value(s) outside it (e.g. {int(labels[bad][0])})"
        )
    rgb = colours[np.where(ignored, 0, labels)]
    rgb[ignored] = ignore_rgb
    return rgb


def save_mask_png(
    path: str | Path,
    mask: ArrayLike,
    palette: ArrayLike,
    *,
    ignore_index: int | None = 255,
    ignore_color: Sequence[int] = (0, 0, 0),
) -> Path:
    """Write :func:`colorize` of ``mask`` ``(H, W)`` as an RGB PNG to ``path`` (parent
    folders are created) and return the path.

    A folder that cannot be created or written raises ``OSError`` naming the path.
    """
    rgb = colorize(mask, palette, ignore_index, ignore_color)
    return _write_png(path, "the mask PNG", lambda out: Image.fromarray(rgb).save(out, "PNG"))


def _write_png(path: str | Path, what: str, write: Callable[[Path], object]) -> Path:
    """Create the parents of ``path`` and ``write(path)``; an ``OSError`` names the path."""
    out = Path(path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write(out)
    except OSError as error:
        raise OSError(
            f"path: cannot write {what} {str(out)!r}: {error.strerror or error}"
        ) from error
    return out


def plot_segmentation_examples(
    images: ArrayLike,
    ground_truth: ArrayLike,
    predictions: Mapping[str, ArrayLike],
    palette: ArrayLike,
    path: str | Path,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
    *,
    ignore_index: int | None = 255,
    ignore_color: Sequence[int] = (0, 0, 0),
) -> Path:
    """A PNG grid with one row per example and the columns image, ground truth and one
    column per entry of ``predictions`` (in its order), plus a legend of the colours of the
    classes that occur in the ground truth or a prediction (and of ``"ignored"`` where
    ``ignore_index`` occurs).

    Args:
        images: ``(N, H, W, 3)`` uint8 RGB images.
        ground_truth: ``(N, H, W)`` integer class maps.
        predictions: name -> ``(N, H, W)`` integer class maps.
        palette: ``(C, 3)`` uint8 class colours.
        path: the PNG to write (parent folders are created; an ``OSError`` names a path
            that cannot be written); returned.
        class_names: ``C`` names for the legend (class indices by default).
        title: figure title.

    Every panel is 2 inches high and ``2 * W / H`` inches wide, with 0.1 inch gaps, at 100
    dpi: the PNG is ``100 * (k * (2 * W / H + 0.1) + 0.1)`` pixels wide for ``k`` columns;
    its height adds the column headers, the title and the legend rows to the ``N`` panels.
    """
    pictures = _to_numpy(images, "images")
    if pictures.dtype != np.uint8 or pictures.ndim != 4 or pictures.shape[-1] != 3:
        raise ValueError(
            f"images must be uint8 RGB (N, H, W, 3), got {pictures.dtype} {pictures.shape}"
        )
    if 0 in pictures.shape:
        raise ValueError(f"images must be non-empty (N, H, W, 3), got {pictures.shape}")
    colours = _check_palette(palette)
    if not isinstance(predictions, Mapping):
        raise TypeError(
            f"predictions must be a mapping name -> (N, H, W), got {type(predictions).__name__}"
        )
    columns = {"ground truth": ground_truth, **predictions}
    if "image" in columns or len(columns) != len(predictions) + 1:
        raise ValueError(
            "predictions must not use the column names 'image' or 'ground truth', "
            f"got {list(predictions)}"
        )
    if class_names is not None and len(class_names) != len(colours):
        raise ValueError(
            f"class_names must have one name per palette colour ({len(colours)}), "
            f"got {len(class_names)}"
        )
    ignore_rgb = _check_color(ignore_color, "ignore_color")
    maps, coloured = {}, {}
    for column, values in columns.items():
        name = "ground_truth" if column == "ground truth" else f"predictions[{column!r}]"
        array = _integer_array(values, name, 3)
        if array.shape != pictures.shape[:3]:
            raise ValueError(
                f"{name} must have the shape (N, H, W) = {pictures.shape[:3]} of images, "
                f"got {array.shape}"
            )
        maps[column] = array
        coloured[column] = _colorize(array, colours, ignore_index, ignore_rgb, name)
    values = {int(c) for array in maps.values() for c in np.unique(array)}
    entries = [
        (str(c) if class_names is None else str(class_names[c]), colours[c])
        for c in sorted(values - {ignore_index})
    ]
    if ignore_index in values:
        entries.append(("ignored", ignore_rgb))

    n, height, width = pictures.shape[:3]
    ncols = len(maps) + 1
    panel_w = _PANEL_HEIGHT * width / height
    fig_w = ncols * (panel_w + _GAP) + _GAP
    per_row = max(1, int(fig_w // _LEGEND_ENTRY_WIDTH))
    legend_h = _LEGEND_ROW * math.ceil(len(entries) / per_row) + _GAP
    top = _HEADER + (_TITLE if title else 0.0)
    fig_h = top + n * (_PANEL_HEIGHT + _GAP) + legend_h
    fig = Figure(figsize=(fig_w, fig_h), dpi=_DPI)
    headers = ["image", *maps]
    for row in range(n):
        for col, header in enumerate(headers):
            left = _GAP + col * (panel_w + _GAP)
            bottom = fig_h - top - (row + 1) * (_PANEL_HEIGHT + _GAP) + _GAP
            ax = fig.add_axes(
                (left / fig_w, bottom / fig_h, panel_w / fig_w, _PANEL_HEIGHT / fig_h)
            )
            picture = pictures[row] if col == 0 else coloured[header][row]
            ax.imshow(picture, interpolation="nearest")
            ax.set_axis_off()
            if row == 0:
                ax.set_title(header, fontsize=10)
    if title:
        fig.suptitle(title, y=1 - 0.5 * _TITLE / fig_h, va="center")
    if entries:
        handles = [
            Patch(facecolor=colour / 255.0, edgecolor="black", label=label)
            for label, colour in entries
        ]
        fig.legend(
            handles=handles,
            loc="lower center",
            ncol=per_row,
            frameon=False,
            fontsize=8,
            bbox_to_anchor=(0.5, 0.0),
        )
    return _write_png(path, "the figure", lambda out: fig.savefig(out, dpi=_DPI))
