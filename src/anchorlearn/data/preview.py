"""Preview a data source: a PNG grid of samples and the class counts.

Spec strings: ``"fashion_mnist"``, ``"fashion_mnist_lt:IR"`` (long-tailed training split,
exponential profile, seed = ``seed``), ``"digits"``, ``"scenes"`` (500 training scenes,
default parameters), ``"npz:PATH"``, ``"folder:PATH"``, ``"segfolder:PATH"``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from anchorlearn.data.long_tail import long_tailed_indices
from anchorlearn.data.scenes import make_scenes
from anchorlearn.data.sources import (
    IGNORE_INDEX,
    ClassificationData,
    SegmentationData,
    load_classification_source,
    load_segmentation_folder,
)

__all__ = ["load_preview_data", "preview"]

_PREVIEW_SCENES = 500


def load_preview_data(spec: str, seed: int = 0) -> ClassificationData | SegmentationData:
    """The data named by a preview spec (module docstring)."""
    kind, _, arg = spec.partition(":")
    if kind == "fashion_mnist_lt":
        try:
            ratio = float(arg)
        except ValueError:
            raise ValueError(
                f"spec 'fashion_mnist_lt:IR' needs a number IR >= 1, got {spec!r}"
            ) from None
        train, _ = load_classification_source("fashion_mnist")
        keep = long_tailed_indices(train.labels, ratio, "exp", seed)
        return ClassificationData(train.images[keep], train.labels[keep], train.class_names)
    if spec == "scenes":
        scenes = make_scenes(_PREVIEW_SCENES, "train", seed=seed)
        return SegmentationData(scenes.images, scenes.masks, scenes.class_names)
    if kind == "segfolder" and arg:
        return load_segmentation_folder(arg)
    if spec in ("fashion_mnist", "digits") or (kind in ("npz", "folder") and arg):
        return load_classification_source(spec)[0]
    raise ValueError(
        "spec must be one of 'fashion_mnist', 'fashion_mnist_lt:IR', 'digits', 'scenes', "
        f"'npz:PATH', 'folder:PATH', 'segfolder:PATH', got {spec!r}"
    )


def _class_counts(data: ClassificationData | SegmentationData) -> dict[str, int]:
    if isinstance(data, ClassificationData):
        counts = np.bincount(data.labels, minlength=data.num_classes)
    else:
        values = data.masks[data.masks != IGNORE_INDEX].astype(np.int64)
        counts = np.bincount(values, minlength=data.num_classes)
    return {name: int(n) for name, n in zip(data.class_names, counts, strict=False)}


def preview_path(out_png: str | os.PathLike[str]) -> Path:
    """The file :func:`preview` writes for ``out_png``: ``.png`` is added when the name has
    no suffix; an existing directory is refused."""
    out = Path(out_png)
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory: give a file name such as {out / 'grid.png'}")
    return out if out.suffix else out.with_suffix(".png")


def preview(
    spec: str, out_png: str | os.PathLike[str], n: int = 32, seed: int = 0
) -> dict[str, int]:
    """Write a grid of ``n`` random samples of ``spec`` to ``out_png`` and print the class
    counts (images per class, or pixels per class for segmentation, ignore excluded).

    Classification samples are titled with their class name; segmentation samples show the
    image with its mask overlaid in a colour map (ignore pixels in white).

    Returns:
        class name -> count.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = load_preview_data(spec, seed)
    counts = _class_counts(data)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(data.images), size=min(n, len(data.images)), replace=False))
    cols = min(8, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.45 * rows), squeeze=False)
    colours = plt.get_cmap("tab20")
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), chosen, strict=False):
        image = data.images[i]
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
        if isinstance(data, ClassificationData):
            ax.set_title(data.class_names[data.labels[i]], fontsize=7)
        else:
            mask = data.masks[i]
            overlay = colours(mask % 20)
            overlay[..., 3] = np.where(mask == 0, 0.0, 0.55)
            overlay[mask == IGNORE_INDEX] = (1.0, 1.0, 1.0, 0.9)
            ax.imshow(overlay, interpolation="nearest")
            present = [data.class_names[c] for c in np.unique(mask) if 0 < c < IGNORE_INDEX]
            ax.set_title(", ".join(present), fontsize=5)
    fig.suptitle(f"{spec}: {len(data.images)} samples", fontsize=9)
    fig.tight_layout()
    out = preview_path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    unit = "images" if isinstance(data, ClassificationData) else "pixels"
    width = max(len(name) for name in counts)
    print(f"{spec}: {unit} per class")
    for name, count in counts.items():
        print(f"  {name:<{width}}  {count}")
    return counts
