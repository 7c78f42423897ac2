"""Preview a data source: a PNG grid of samples and the class counts.

Spec strings: ``"fashion_mnist"``, ``"fashion_mnist_lt:IR"`` (long-tailed training split,
exponential profile, seed = ``seed``), ``"digits"``, ``"cifar10:ROOT"`` (its training
split), ``"scenes"`` (500 training scenes, default parameters), ``"npz:PATH"``,
``"folder:PATH"``, ``"segfolder:PATH"``, and the
standard segmentation data sets ``"ade20k:ROOT"``, ``"camvid:ROOT"``, ``"cityscapes:ROOT"``,
``"pascal_context:ROOT"``, ``"voc:ROOT"`` (see :mod:`anchorlearn.data.segmentation_sets`;
only the ``n`` sampled training images are read, and their pixels counted).
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
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

__all__ = ["SampledSegmentation", "load_preview_data", "preview", "sample_segmentation"]

_PREVIEW_SCENES = 500
# the kinds of anchorlearn.data.segmentation_sets (not imported here: it needs torch)
_SEGMENTATION_KINDS = ("ade20k", "camvid", "cityscapes", "pascal_context", "voc")


@dataclass
class SampledSegmentation:
    """``n`` images drawn from a large segmentation data set, of any sizes.

    Attributes:
        images: uint8 ``(H, W, 3)`` arrays.
        masks: int64 ``(H, W)`` arrays of train ids or :data:`IGNORE_INDEX`.
        class_names: one name per class.
        palette: uint8 ``(num_classes, 3)`` colours.
        total: the number of images in the split sampled from.
    """

    images: list[np.ndarray]
    masks: list[np.ndarray]
    class_names: list[str]
    palette: np.ndarray
    total: int

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def sample_segmentation(spec: str, n: int, seed: int = 0) -> SampledSegmentation:
    """``n`` random training images (all when fewer) of a standard segmentation data set
    ``spec`` (``"KIND:ROOT"``), in index order; only those files are read."""
    from anchorlearn.data.segmentation_sets import open_segmentation

    dataset = open_segmentation(spec, "train")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(dataset), size=min(n, len(dataset)), replace=False))
    pairs = [dataset[int(i)] for i in chosen]
    return SampledSegmentation(
        [image for image, _ in pairs],
        [mask for _, mask in pairs],
        dataset.class_names,
        dataset.palette,
        len(dataset),
    )


def _refuse_config(spec: str) -> None:
    """A training config given as the spec: say which spec previews its data source."""
    if Path(spec).suffix.lower() not in (".yaml", ".yml"):
        return
    import yaml

    hint = "a data source such as 'fashion_mnist_lt:100'"
    try:
        data = yaml.safe_load(Path(spec).read_text()).get("data") or {}
        source = str(data["source"])
    except (OSError, yaml.YAMLError, AttributeError, KeyError, TypeError, ValueError):
        pass  # unreadable, or no data.source: the generic hint
    else:
        ratio = data.get("imbalance_ratio", 1)
        if source == "fashion_mnist" and isinstance(ratio, (int, float)) and ratio > 1:
            source = f"fashion_mnist_lt:{ratio:g}"
        hint = f"its data source: anchorlearn data preview {source} --out PNG"
        if source == "scenes":
            hint += " (the scenes with their default parameters, not the config's)"
    raise ValueError(f"{spec} is a config file; data preview takes a data source SPEC; {hint}")


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
    if spec in ("fashion_mnist", "digits") or (kind in ("npz", "folder", "cifar10") and arg):
        return load_classification_source(spec)[0]
    raise ValueError(
        "spec must be one of 'fashion_mnist', 'fashion_mnist_lt:IR', 'digits', 'cifar10:ROOT', "
        "'scenes', 'npz:PATH', 'folder:PATH', 'segfolder:PATH', "
        + ", ".join(f"'{kind}:ROOT'" for kind in _SEGMENTATION_KINDS)
        + f", got {spec!r}"
    )


def _is_segmentation_set(spec: str) -> bool:
    kind, sep, root = spec.partition(":")
    return bool(sep and root) and kind in _SEGMENTATION_KINDS


def _class_counts(
    data: ClassificationData | SegmentationData | SampledSegmentation,
) -> dict[str, int]:
    if isinstance(data, ClassificationData):
        counts = np.bincount(data.labels, minlength=data.num_classes)
    elif isinstance(data, SampledSegmentation):
        counts = np.zeros(data.num_classes, dtype=np.int64)
        for mask in data.masks:
            counts += np.bincount(mask[mask != IGNORE_INDEX], minlength=data.num_classes)
    else:
        values = data.masks[data.masks != IGNORE_INDEX].astype(np.int64)
        counts = np.bincount(values, minlength=data.num_classes)
    return {name: int(n) for name, n in zip(data.class_names, counts, strict=False)}


def preview_path(out_png: str | os.PathLike[str]) -> Path:
    """The file :func:`preview` writes for ``out_png``: ``.png`` is added when the name has
    no suffix; an existing directory is refused. Its folder is created and a temporary file
    written there now, so that an unwritable path fails before the data are loaded."""
    out = Path(out_png)
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory: give a file name such as {out / 'grid.png'}")
    out = out if out.suffix else out.with_suffix(".png")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as err:
        raise ValueError(
            f"--out {out}: cannot create the folder {out.parent} or write there "
            f"({err.strerror or err})"
        ) from err
    return out


def preview(
    spec: str, out_png: str | os.PathLike[str], n: int = 32, seed: int = 0
) -> dict[str, int]:
    """Write a grid of ``n`` random samples of ``spec`` to ``out_png`` and print the class
    counts (images per class, or pixels per class for segmentation, ignore excluded).

    Classification samples are titled with their class name; segmentation samples show the
    image with its mask overlaid in a colour map (ignore pixels in white). For a standard
    segmentation data set (``"KIND:ROOT"``) only ``n`` training images are read, and the
    counts are those of their pixels.

    Returns:
        class name -> count.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    _refuse_config(spec)
    out = preview_path(out_png)  # an unwritable path fails before the data are loaded
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if _is_segmentation_set(spec):
        data: ClassificationData | SegmentationData | SampledSegmentation
        data = sample_segmentation(spec, n, seed)
        chosen = np.arange(len(data.images))
        title = f"{spec}: {len(chosen)} of {data.total} training images"
    else:
        data = load_preview_data(spec, seed)
        rng = np.random.default_rng(seed)
        size = min(n, len(data.images))
        chosen = np.sort(rng.choice(len(data.images), size=size, replace=False))
        title = f"{spec}: {len(data.images)} samples"
    counts = _class_counts(data)
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
            continue
        mask = data.masks[i]
        if isinstance(data, SampledSegmentation):
            # every train id is a real class here: all drawn in the data set's colours
            overlay = np.ones((*mask.shape, 4))
            labelled = mask != IGNORE_INDEX
            overlay[labelled, :3] = data.palette[mask[labelled]] / 255.0
            overlay[..., 3] = np.where(labelled, 0.55, 0.9)
            present = [data.class_names[c] for c in np.unique(mask) if c < IGNORE_INDEX]
            label = ", ".join(present[:4]) + (", ..." if len(present) > 4 else "")
        else:
            overlay = colours(mask % 20)
            overlay[..., 3] = np.where(mask == 0, 0.0, 0.55)
            overlay[mask == IGNORE_INDEX] = (1.0, 1.0, 1.0, 0.9)
            present = [data.class_names[c] for c in np.unique(mask) if 0 < c < IGNORE_INDEX]
            label = ", ".join(present)
        ax.imshow(overlay, interpolation="nearest")
        ax.set_title(label, fontsize=5)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    width = max(len(name) for name in counts)
    if isinstance(data, SampledSegmentation):
        print(f"{spec}: pixels per class in {len(chosen)} of {data.total} training images")
    else:
        unit = "images" if isinstance(data, ClassificationData) else "pixels"
        print(f"{spec}: {unit} per class")
    for name, count in counts.items():
        print(f"  {name:<{width}}  {count}")
    return counts
