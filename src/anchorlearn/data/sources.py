"""Users' own data: ``.npz`` arrays, image folders and segmentation folders.

Every loader validates what it reads and raises an error naming the file (or the index)
at fault, the expectation and what it found.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_EXTENSIONS",
    "ClassificationData",
    "SegmentationData",
    "load_classification_source",
    "load_digits_data",
    "load_image_folder",
    "load_npz_classification",
    "load_segmentation_folder",
]

IGNORE_INDEX = 255
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class ClassificationData:
    """Images with one label each.

    Attributes:
        images: uint8 ``(N, H, W)`` (grey) or ``(N, H, W, C)``.
        labels: int64 ``(N,)`` in ``[0, len(class_names))``.
        class_names: one name per class.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class SegmentationData:
    """Images with a per-pixel class mask.

    Attributes:
        images: uint8 ``(N, H, W)`` or ``(N, H, W, C)``.
        masks: uint8 ``(N, H, W)``, values in ``[0, len(class_names))`` or
            :data:`IGNORE_INDEX` (255).
        class_names: one name per class.
    """

    images: np.ndarray
    masks: np.ndarray
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _size_arg(resize: int | Sequence[int] | None) -> tuple[int, int] | None:
    """``resize`` as ``(height, width)``."""
    if resize is None:
        return None
    if isinstance(resize, int) and not isinstance(resize, bool):
        size = (resize, resize)
    elif isinstance(resize, Sequence) and len(resize) == 2:
        size = (int(resize[0]), int(resize[1]))
    else:
        raise TypeError(f"resize must be None, an int or (height, width), got {resize!r}")
    if min(size) < 1:
        raise ValueError(f"resize must be positive, got {resize!r}")
    return size


def _check_dir(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if not path.is_dir():
        raise ValueError(f"{what} must be a directory, got a file: {path}")


def _image_files(directory: Path) -> list[Path]:
    return sorted(
        p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


# PIL modes whose pixels are 8-bit: grey, bilevel, palette and (grey or RGB) with alpha
_EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"})


def _open_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            return img
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path}: cannot be read as an image ({err})") from err


def _stack_images(
    images: list[Image.Image], paths: list[Path], size: tuple[int, int] | None
) -> np.ndarray:
    """Stack PIL images into uint8 NHW (all grey) or NHWC RGB, resizing or checking sizes."""
    for img, path in zip(images, paths, strict=True):
        if img.mode not in _EIGHT_BIT_MODES:
            # converting 16-bit or float pixels to 8 bits clips them (most turn white)
            raise ValueError(
                f"{path}: image mode {img.mode!r} is not 8-bit; convert the images to 8-bit "
                "grey or RGB first (e.g. rescale 16-bit values to 0-255)"
            )
    grey = all(img.mode in ("L", "1") for img in images)
    arrays = []
    for img, path in zip(images, paths, strict=True):
        img = img.convert("L" if grey else "RGB")
        if size is not None:
            img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        elif img.size != images[0].size:
            raise ValueError(
                f"{path}: image size {img.size[1]}x{img.size[0]} differs from "
                f"{paths[0]} ({images[0].size[1]}x{images[0].size[0]}); resize the files to "
                "one size (or load them with load_image_folder(path, resize=...))"
            )
        arrays.append(np.asarray(img, dtype=np.uint8))
    return np.stack(arrays)


def _oversized_array(path: Path) -> str | None:
    """What is wrong with the first member of the ``.npz`` archive whose ``.npy`` header
    claims more data than the member holds (a corrupt or crafted file), read before numpy
    allocates what the header claims; ``None`` when every claim fits."""
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(member)
                elif version == (2, 0):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(member)
                else:  # left to numpy, which reads or refuses other versions itself
                    continue
                data_bytes = info.file_size - member.tell()
            claimed = math.prod(shape) * dtype.itemsize
            if not dtype.hasobject and claimed > data_bytes:
                return (
                    f"array {info.filename[:-4]!r} claims shape {tuple(shape)} of {dtype} "
                    f"({_byte_size(claimed)}) but the archive holds {data_bytes} bytes of it"
                )
    return None


def _byte_size(n: int) -> str:
    """``n`` bytes, in the largest binary unit that keeps the number >= 1."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


_NPZ_READ_ERRORS = (OSError, EOFError, ValueError, TypeError, zipfile.BadZipFile)


def _not_npz(path: Path, err: Exception) -> ValueError:
    return ValueError(
        f"{path}: not a readable .npz archive of numeric arrays ({type(err).__name__}); "
        "write one with numpy.savez(path, images=..., labels=...)"
    )


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` archive; a file numpy cannot read that way (not a zip, cut
    short, a bare ``.npy``, pickled objects, a header claiming more data than the file
    holds) is a ``ValueError`` naming it."""
    try:
        oversized = _oversized_array(path)
    except _NPZ_READ_ERRORS as err:
        raise _not_npz(path, err) from err
    if oversized:
        raise ValueError(
            f"{path}: {oversized}: the file is corrupt or was not written by numpy.savez; "
            "write it again"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except _NPZ_READ_ERRORS as err:
        raise _not_npz(path, err) from err
    except MemoryError as err:  # arrays as large as they claim, too large for this machine
        raise MemoryError(f"{path}: {' '.join(str(err).split())}") from None


def load_npz_classification(path: str | os.PathLike[str]) -> ClassificationData:
    """Load ``images`` (uint8 ``(N, H, W)`` or ``(N, H, W, C)``) and ``labels`` (integer
    ``(N,)``) from an ``.npz`` file; optional ``class_names`` (``(K,)`` strings).

    Without ``class_names`` the classes are ``0 .. max(labels)`` and each must occur.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"npz file not found: {path}")
    arrays = _read_npz(path)
    missing = [key for key in ("images", "labels") if key not in arrays]
    if missing:
        raise ValueError(
            f"{path}: missing array(s) {missing}: expected 'images' and 'labels', "
            f"got {sorted(arrays)}"
        )
    images, labels = arrays["images"], arrays["labels"]
    names = [str(n) for n in arrays["class_names"]] if "class_names" in arrays else None
    if images.dtype != np.uint8:
        raise ValueError(f"{path}: 'images' must have dtype uint8, got {images.dtype}")
    if images.ndim not in (3, 4):
        raise ValueError(
            f"{path}: 'images' must have shape (N, H, W) or (N, H, W, C), got {images.shape}"
        )
    if images.ndim == 4 and images.shape[-1] not in (1, 3, 4):
        hint = " (it looks like (N, C, H, W): transpose it)" if images.shape[1] in (1, 3, 4) else ""
        raise ValueError(
            f"{path}: 'images' must be (N, H, W, C) with C in (1, 3, 4), got shape "
            f"{images.shape}{hint}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: 'labels' must have an integer dtype, got {labels.dtype}")
    if labels.ndim != 1:
        raise ValueError(f"{path}: 'labels' must have shape (N,), got {labels.shape}")
    if len(labels) != len(images):
        raise ValueError(
            f"{path}: 'images' and 'labels' lengths differ: {len(images)} images, "
            f"{len(labels)} labels"
        )
    labels = labels.astype(np.int64)
    return ClassificationData(images, labels, _checked_class_names(labels, names, path))


def _checked_class_names(labels: np.ndarray, names: list[str] | None, path: Path) -> list[str]:
    if len(labels) == 0:
        raise ValueError(f"{path}: no samples")
    negative = np.flatnonzero(labels < 0)
    if len(negative):
        i = int(negative[0])
        raise ValueError(f"{path}: labels must be >= 0, got {labels[i]} at index {i}")
    num_classes = len(names) if names is not None else int(labels.max()) + 1
    too_large = np.flatnonzero(labels >= num_classes)
    if len(too_large):
        i = int(too_large[0])
        raise ValueError(
            f"{path}: labels must be < {num_classes} (the number of class_names), "
            f"got {labels[i]} at index {i}"
        )
    repeated = sorted(n for n, c in Counter(names or []).items() if c > 1)
    if repeated:
        raise ValueError(f"{path}: class_names must be distinct, {repeated[0]!r} repeats")
    counts = np.bincount(labels, minlength=num_classes)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        raise ValueError(
            f"{path}: every class needs at least one sample, classes {empty.tolist()} are empty"
        )
    return names if names is not None else [str(c) for c in range(num_classes)]


def load_image_folder(
    path: str | os.PathLike[str], resize: int | Sequence[int] | None = None
) -> ClassificationData:
    """Load a folder with one sub-folder of images per class (class names = sub-folder
    names, sorted).

    Args:
        path: the root folder.
        resize: ``None`` (all images must share one size), an int or ``(height, width)``.

    Images are grey ``(N, H, W)`` when every file is grey, otherwise RGB ``(N, H, W, 3)``.
    """
    root = Path(path)
    _check_dir(root, "image folder")
    size = _size_arg(resize)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if not class_dirs:
        raise ValueError(f"{root}: expected one sub-folder per class, got none")
    images, paths, labels = [], [], []
    for label, class_dir in enumerate(class_dirs):
        files = _image_files(class_dir)
        if not files:
            raise ValueError(
                f"{class_dir}: empty class: expected image files ({', '.join(IMAGE_EXTENSIONS)})"
            )
        for file in files:
            images.append(_open_image(file))
            paths.append(file)
            labels.append(label)
    return ClassificationData(
        _stack_images(images, paths, size),
        np.asarray(labels, dtype=np.int64),
        [d.name for d in class_dirs],
    )


def load_segmentation_folder(
    path: str | os.PathLike[str], resize: int | Sequence[int] | None = None
) -> SegmentationData:
    """Load ``images/`` and ``masks/`` sub-folders: for each image ``images/STEM.*`` a
    single-channel PNG ``masks/STEM.png`` of class indices, 255 = ignore.

    An optional ``classes.txt`` (one name per line) names the classes and bounds the mask
    values; without it the classes are ``0 .. max(mask values other than 255)``, and at
    least half of them must occur: a stray value (one ``>= 2 *`` the number of distinct
    values, such as a 200 among 0, 1 and 2) is an error naming it and the files that hold
    it, rather than a model with empty classes.
    Masks are resized with nearest-neighbour sampling.
    """
    root = Path(path)
    _check_dir(root, "segmentation folder")
    image_dir, mask_dir = root / "images", root / "masks"
    _check_dir(image_dir, "images folder")
    _check_dir(mask_dir, "masks folder")
    size = _size_arg(resize)
    image_files = _image_files(image_dir)
    if not image_files:
        raise ValueError(f"{image_dir}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    stems = {p.stem for p in image_files}
    orphans = sorted(p.name for p in mask_dir.glob("*.png") if p.stem not in stems)
    if orphans:
        raise ValueError(f"{mask_dir}: masks without an image in {image_dir}: {orphans}")
    images, masks = [], []
    for image_file in image_files:
        mask_file = mask_dir / f"{image_file.stem}.png"
        if not mask_file.is_file():
            raise FileNotFoundError(f"missing mask for {image_file}: expected {mask_file}")
        image, mask = _open_image(image_file), _open_image(mask_file)
        if mask.mode not in ("L", "P", "1"):
            raise ValueError(
                f"{mask_file}: a mask must be a single-channel PNG (mode L or P), "
                f"got mode {mask.mode}"
            )
        if mask.size != image.size:
            raise ValueError(
                f"{mask_file}: mask size {mask.size[1]}x{mask.size[0]} differs from its image "
                f"{image_file} ({image.size[1]}x{image.size[0]})"
            )
        if size is not None:
            mask = mask.resize((size[1], size[0]), Image.Resampling.NEAREST)
        images.append(image)
        masks.append(np.asarray(mask, dtype=np.uint8))
    image_array = _stack_images(images, image_files, size)
    mask_array = np.stack(masks)
    names_file = root / "classes.txt"
    if names_file.is_file():
        names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        bad = np.flatnonzero((mask_array != IGNORE_INDEX) & (mask_array >= len(names)))
        if len(bad):
            index = np.unravel_index(int(bad[0]), mask_array.shape)
            raise ValueError(
                f"{mask_dir / (image_files[index[0]].stem + '.png')}: mask values must be "
                f"< {len(names)} (classes in {names_file}) or {IGNORE_INDEX}, got "
                f"{mask_array[index]} at pixel {tuple(int(i) for i in index[1:])}"
            )
    else:
        names = _inferred_class_names(mask_array, image_files, mask_dir, names_file)
    return SegmentationData(image_array, mask_array, names)


def _inferred_class_names(
    masks: np.ndarray, image_files: list[Path], mask_dir: Path, names_file: Path
) -> list[str]:
    """Class names ``"0" .. "max"`` of uint8 ``masks`` ``(N, H, W)`` (:data:`IGNORE_INDEX`
    is never a class), refusing stray values: at least half of the classes ``0 .. max``
    must occur, so a value ``v >= 2 * (number of distinct values)`` is refused with the
    files that hold it."""
    counts = np.bincount(masks.reshape(-1), minlength=256)
    counts[IGNORE_INDEX] = 0
    present = np.flatnonzero(counts)
    if present.size == 0:
        raise ValueError(f"{mask_dir}: every mask pixel is ignore ({IGNORE_INDEX})")
    top = int(present[-1])
    stray = present[present >= 2 * present.size]
    if stray.size:
        holds = np.isin(masks, stray).reshape(len(masks), -1).any(axis=1)
        files = [f"{image_files[i].stem}.png" for i in np.flatnonzero(holds)]
        where = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        pixels = int(counts[stray].sum())
        raise ValueError(
            f"{mask_dir}: mask value{'s' * (stray.size > 1)} "
            f"{', '.join(str(v) for v in stray)} ({pixels} pixel{'s' * (pixels > 1)}, in "
            f"{where}) look{'s' * (stray.size == 1)} stray: without {names_file.name} the "
            f"classes are 0..{top} and only {present.size} of them occur (at least half "
            f"must); add {names_file} (one class name per line) or fix the masks"
        )
    return [str(c) for c in range(top + 1)]


def load_digits_data() -> ClassificationData:
    """scikit-learn's 1,797 hand-written digits, 8x8, rescaled from 0-16 to uint8 0-255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return ClassificationData(images, digits.target.astype(np.int64), [str(d) for d in range(10)])


def load_classification_source(
    source: str, data_root: str | os.PathLike[str] | None = None
) -> tuple[ClassificationData, ClassificationData | None]:
    """Load a classification source by name: ``"fashion_mnist"``, ``"digits"``,
    ``"cifar10:ROOT"`` (:func:`anchorlearn.data.cifar.load_cifar10`), ``"npz:PATH"`` or
    ``"folder:PATH"``.

    Returns:
        ``(train, test)``; ``test`` is ``None`` for sources without a predefined test split.
    """
    from anchorlearn.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist

    if source == "fashion_mnist":
        names = list(FASHION_MNIST_CLASSES)
        return (
            ClassificationData(*load_fashion_mnist("train", data_root), names),
            ClassificationData(*load_fashion_mnist("test", data_root), names),
        )
    if source == "digits":
        return load_digits_data(), None
    kind, _, path = source.partition(":")
    if kind == "npz" and path:
        return load_npz_classification(path), None
    if kind == "folder" and path:
        return load_image_folder(path), None
    if kind == "cifar10" and path:
        from anchorlearn.data.cifar import load_cifar10

        return load_cifar10(path)
    raise ValueError(
        "source must be 'fashion_mnist', 'digits', 'cifar10:ROOT', 'npz:PATH' or "
        f"'folder:PATH', got {source!r}"
    )
