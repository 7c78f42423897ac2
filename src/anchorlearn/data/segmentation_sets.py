"""Standard semantic-segmentation data sets in their usual folder layouts, read lazily.

:func:`open_segmentation` takes a spec ``"KIND:ROOT"`` and a split and returns a
:class:`SegmentationDataset`, a ``torch.utils.data.Dataset`` that lists the (image,
annotation) file pairs at construction and reads one pair per ``ds[i]``:

=================  ============================================================  =======
KIND               ROOT (the data-set folder, or the parent named in brackets)  classes
=================  ============================================================  =======
``ade20k``         ``ADEChallengeData2016`` (or its parent)                       150
``cityscapes``     the folder holding ``leftImg8bit/`` and ``gtFine/``            19
                   (or its parent, as ``cityscapes/``)
``pascal_context`` ``VOCdevkit/VOC2010`` (or ``VOCdevkit``, or its parent)        59
``voc``            ``VOCdevkit/VOC2012`` (or ``VOCdevkit``, or its parent)        21
``camvid``         the SegNet ``CamVid`` folder (or its parent)                   11
=================  ============================================================  =======

Each data set maps the raw annotation values to train ids with a 256-entry lookup table
(``label_map``): train ids lie in ``[0, num_classes)``, 255 is ignore. A raw value the data
set cannot contain is an error naming the file and the value, so that a wrong ``KIND`` (for
example Cityscapes ``labelIds`` read as ``labelTrainIds``) fails instead of training on
garbage.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

__all__ = [
    "ADE20K_CLASSES",
    "CAMVID_CLASSES",
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_ID_TO_TRAIN_ID",
    "IGNORE_INDEX",
    "PASCAL_CONTEXT_CLASSES",
    "SEGMENTATION_KINDS",
    "VOC_CLASSES",
    "SegmentationDataset",
    "open_segmentation",
    "voc_palette",
]

IGNORE_INDEX = 255

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane",
    "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant",
    "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror",
    "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp",
    "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator",
    "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door",
    "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer",
    "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman",
    "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt",
    "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)  # fmt: skip

_ADE20K_PALETTE = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3),
    (120, 120, 80), (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7),
    (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82),
    (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250),
    (255, 6, 51), (11, 102, 255), (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220),
    (255, 9, 92), (112, 9, 255), (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71),
    (255, 41, 10), (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7),
    (255, 122, 8), (0, 255, 20), (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255),
    (160, 150, 20), (0, 163, 255), (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0),
    (255, 31, 0), (255, 224, 0), (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255),
    (0, 173, 255), (31, 0, 255), (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255),
    (0, 255, 112), (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0),
    (0, 143, 255), (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255),
    (173, 255, 0), (0, 255, 153), (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102),
    (255, 173, 0), (255, 0, 20), (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255),
    (255, 0, 204), (0, 255, 194), (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255),
    (0, 194, 255), (0, 122, 255), (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0),
    (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255),
    (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112),
    (92, 255, 0), (0, 224, 255), (112, 224, 255), (70, 184, 160), (163, 0, 255),
    (153, 0, 255), (71, 255, 0), (255, 0, 163), (255, 204, 0), (255, 0, 143), (0, 255, 235),
    (133, 255, 0), (255, 0, 235), (245, 0, 255), (255, 0, 122), (255, 245, 0), (10, 190, 212),
    (214, 255, 0), (0, 204, 255), (20, 0, 255), (255, 255, 0), (0, 153, 255), (0, 41, 255),
    (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255), (71, 0, 255),
    (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0), (0, 133, 255), (255, 214, 0),
    (25, 194, 194), (102, 255, 0), (92, 0, 255),
)  # fmt: skip

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip

_CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip

# The official Cityscapes label ids (0..33) that are evaluated, and their train ids; every
# other id (unlabeled, ego vehicle, ground, parking, rail track, guard rail, bridge, tunnel,
# polegroup, caravan, trailer, ...) is ignored.
CITYSCAPES_ID_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
    25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip

# The 59 classes of Pascal-Context as the usual converter numbers them (1..59, in the
# alphabetical order of the full Context label list; 0 is background).
PASCAL_CONTEXT_CLASSES = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book",
    "bottle", "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth",
    "computer", "cow", "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food",
    "grass", "ground", "horse", "keyboard", "light", "motorbike", "mountain", "mouse",
    "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves",
    "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck",
    "tvmonitor", "wall", "water", "window", "wood",
)  # fmt: skip

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

CAMVID_CLASSES = (
    "sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car",
    "pedestrian", "bicyclist",
)  # fmt: skip

_CAMVID_PALETTE = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
    (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
)  # fmt: skip

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def voc_palette(num_classes: int) -> np.ndarray:
    """``(num_classes, 3)`` uint8 colours of Pascal VOC's scheme: the bits of the class
    index are dealt out in turn to red, green and blue, from the most significant bit of
    each channel down. Class 0 is black, class 1 ``(128, 0, 0)``, class 2 ``(0, 128, 0)``."""
    index = np.arange(num_classes, dtype=np.int64)
    palette = np.zeros((num_classes, 3), dtype=np.int64)
    for bit in range(8):
        for channel in range(3):
            palette[:, channel] |= ((index >> (3 * bit + channel)) & 1) << (7 - bit)
    return palette.astype(np.uint8)


def _describe_values(values: np.ndarray) -> str:
    """``[0, 1, 2, 3, 255]`` -> ``"0..3 or 255"``."""
    runs: list[str] = []
    start = prev = int(values[0])
    for value in [int(v) for v in values[1:]] + [None]:
        if value is not None and value == prev + 1:
            prev = value
            continue
        runs.append(str(start) if start == prev else f"{start}..{prev}")
        if value is not None:
            start = prev = value
    return runs[0] if len(runs) == 1 else ", ".join(runs[:-1]) + " or " + runs[-1]


class SegmentationDataset(Dataset):
    """Image / annotation file pairs read one at a time.

    ``ds[i]`` returns ``(image, mask)``: ``image`` uint8 ``(H, W, 3)`` RGB (grey, palette,
    RGBA and CMYK files converted), ``mask`` int64 ``(H, W)`` of train ids in
    ``[0, num_classes)`` or :data:`IGNORE_INDEX`.

    Args:
        name: the data set's name (``"camvid"``, ...), used in messages.
        split: the split's name.
        root: the data-set folder.
        files: ``(image path, annotation path)`` pairs.
        class_names: one name per train id.
        palette: uint8 ``(num_classes, 3)``, a colour per class for drawing masks.
        label_map: int64 ``(256,)``, raw annotation value -> train id (255 = ignore).
        raw_values: the raw values the annotations may hold; any other value is an error.
    """

    ignore_index = IGNORE_INDEX

    def __init__(
        self,
        name: str,
        split: str,
        root: str | os.PathLike[str],
        files: Sequence[tuple[Path, Path]],
        class_names: Sequence[str],
        palette: np.ndarray,
        label_map: np.ndarray,
        raw_values: Sequence[int] | np.ndarray,
    ) -> None:
        self.name = name
        self.split = split
        self.root = Path(root)
        self.files = [(Path(image), Path(annotation)) for image, annotation in files]
        self.class_names = list(class_names)
        num_classes = len(self.class_names)
        self.palette = np.asarray(palette, dtype=np.uint8)
        if self.palette.shape != (num_classes, 3):
            raise ValueError(
                f"palette must have shape ({num_classes}, 3) for {num_classes} classes, "
                f"got {self.palette.shape}"
            )
        self.label_map = np.asarray(label_map, dtype=np.int64)
        if self.label_map.shape != (256,):
            raise ValueError(f"label_map must have shape (256,), got {self.label_map.shape}")
        targets = self.label_map[(self.label_map != IGNORE_INDEX)]
        if targets.size and (targets.min() < 0 or targets.max() >= num_classes):
            raise ValueError(
                f"label_map values must lie in [0, {num_classes}) or be {IGNORE_INDEX}, got "
                f"{targets.min()}..{targets.max()}"
            )
        raw = np.unique(np.asarray(raw_values, dtype=np.int64))
        if raw.size == 0 or raw.min() < 0 or raw.max() > 255:
            raise ValueError(f"raw_values must be a non-empty subset of 0..255, got {raw_values}")
        self.raw_values = raw
        self._raw_allowed = np.zeros(256, dtype=bool)
        self._raw_allowed[raw] = True

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return (
            f"SegmentationDataset(name={self.name!r}, split={self.split!r}, root='{self.root}', "
            f"{len(self)} images, {self.num_classes} classes)"
        )

    def _pair(self, index: int) -> tuple[Path, Path]:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if not -len(self.files) <= index < len(self.files):
            raise IndexError(
                f"index {index} is out of range for {self.name} {self.split} "
                f"({len(self.files)} images)"
            )
        return self.files[index]

    def image_path(self, index: int) -> Path:
        """The image file of sample ``index``."""
        return self._pair(index)[0]

    def read_image(self, index: int) -> np.ndarray:
        """Sample ``index``'s image as uint8 ``(H, W, 3)`` RGB."""
        path = self._pair(index)[0]
        image = _open(path)
        if image.mode not in _EIGHT_BIT_MODES:
            raise ValueError(
                f"{path}: image mode {image.mode!r} is not 8-bit; convert it to 8-bit RGB"
            )
        return np.array(image.convert("RGB"), dtype=np.uint8)

    def read_raw_mask(self, index: int) -> np.ndarray:
        """Sample ``index``'s annotation as stored (``(H, W)`` raw values, not mapped)."""
        path = self._pair(index)[1]
        mask = _open(path)
        if mask.mode not in _MASK_MODES:
            raise ValueError(
                f"{path}: an annotation must be a single-channel image of label ids (mode L, P "
                f"or I), got mode {mask.mode} (a colour-coded mask? convert it to ids first)"
            )
        return np.asarray(mask)

    def read_mask(self, index: int) -> np.ndarray:
        """Sample ``index``'s annotation mapped to train ids: int64 ``(H, W)``."""
        path = self._pair(index)[1]
        return self._map(self.read_raw_mask(index), path)

    def _map(self, raw: np.ndarray, path: Path) -> np.ndarray:
        if raw.dtype != np.uint8:
            raw = raw.astype(np.int64)
            low, high = int(raw.min()), int(raw.max())
            if low < 0 or high > 255:
                raise self._bad_value(path, low if low < 0 else high)
            raw = raw.astype(np.uint8)
        present = np.bincount(raw.ravel(), minlength=256) > 0
        bad = np.flatnonzero(present & ~self._raw_allowed)
        if bad.size:
            raise self._bad_value(path, int(bad[0]))
        return self.label_map[raw]

    def _bad_value(self, path: Path, value: int) -> ValueError:
        return ValueError(
            f"{path}: annotation value {value} is not a {self.name} label "
            f"(expected {_describe_values(self.raw_values)})"
        )

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_file, mask_file = self._pair(index)
        image, mask = self.read_image(index), self.read_mask(index)
        if image.shape[:2] != mask.shape:
            raise ValueError(
                f"{mask_file}: annotation size {mask.shape[0]}x{mask.shape[1]} differs from "
                f"its image {image_file} ({image.shape[0]}x{image.shape[1]})"
            )
        return image, mask


_EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"})
_MASK_MODES = frozenset({"1", "L", "P", "I", "I;16", "I;16B", "I;16L"})


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except FileNotFoundError:
        raise FileNotFoundError(f"file not found: {path}") from None
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path}: cannot be read as an image ({err})") from err


# ---------------------------------------------------------------------------------------
# Layouts


def _find_root(kind: str, root: Path, nests: Sequence[str], marker: str) -> Path:
    """The first of ``root``, ``root/nest`` ... that holds ``marker``."""
    candidates = [root] + [root / nest for nest in nests]
    for candidate in candidates:
        if (candidate / marker).exists():
            return candidate
    expected = " or ".join(str(c / marker) for c in candidates)
    raise FileNotFoundError(f"{kind} data not found under {root}: expected {expected}")


def _split_path(
    kind: str, split: str, known: Sequence[str], path_of: Callable[[str], Path], what: str
) -> Path:
    """``path_of(split)`` (the split's folder or list file) when ``split`` is one of ``known``
    and the path exists; else an error naming the path and the splits found on disk."""
    available = [name for name in known if path_of(name).exists()]
    listed = ", ".join(available) if available else "none"
    path = path_of(split)
    if split not in known:
        raise ValueError(
            f"{kind} has no split {split!r} (no {what} {path}); available splits: {listed}"
        )
    if not path.exists():
        raise FileNotFoundError(
            f"{kind} split {split!r} not found: expected {what} {path}; available splits: {listed}"
        )
    return path


def _check_nonempty(kind: str, split: str, files: Sequence[object], where: str) -> None:
    if not files:
        raise ValueError(f"{kind} split {split!r} is empty: no {where}")


def _missing_annotation(image: Path, annotation: Path) -> FileNotFoundError:
    return FileNotFoundError(f"image {image} has no annotation: expected {annotation}")


def _images_in(folder: Path, suffixes: Sequence[str]) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)


def _read_list(list_file: Path) -> list[tuple[str, ...]]:
    """Non-blank lines of a split list, each split on white space: one id, or an image and
    an annotation path."""
    rows = []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        fields = tuple(line.split())
        if not fields:
            continue
        if len(fields) > 2:
            raise ValueError(
                f"{list_file}: line {number}: expected an id or 'IMAGE ANNOTATION', got {line!r}"
            )
        rows.append(fields)
    return rows


def _shift_map(num_raw: int) -> np.ndarray:
    """Raw 0 -> ignore, ``k`` -> ``k - 1`` for ``k`` in ``1 .. num_raw - 1``."""
    label_map = np.full(256, IGNORE_INDEX, dtype=np.int64)
    label_map[1:num_raw] = np.arange(num_raw - 1)
    return label_map


def _identity_map(num_classes: int) -> np.ndarray:
    label_map = np.full(256, IGNORE_INDEX, dtype=np.int64)
    label_map[:num_classes] = np.arange(num_classes)
    return label_map


def _ade20k(root: Path, split: str) -> SegmentationDataset:
    root = _find_root("ade20k", root, ["ADEChallengeData2016"], "images")
    folders = {"train": "training", "val": "validation"}
    image_dir = _split_path(
        "ade20k", split, list(folders), lambda s: root / "images" / folders.get(s, s), "folder"
    )
    mask_dir = root / "annotations" / folders[split]
    files = []
    for image in _images_in(image_dir, (".jpg", ".jpeg", ".png")):
        annotation = mask_dir / f"{image.stem}.png"
        if not annotation.is_file():
            raise _missing_annotation(image, annotation)
        files.append((image, annotation))
    _check_nonempty("ade20k", split, files, f"*.jpg images in {image_dir}")
    return SegmentationDataset(
        "ade20k",
        split,
        root,
        files,
        ADE20K_CLASSES,
        np.array(_ADE20K_PALETTE),
        _shift_map(151),
        np.arange(151),
    )


def _cityscapes(root: Path, split: str) -> SegmentationDataset:
    root = _find_root("cityscapes", root, ["cityscapes"], "leftImg8bit")
    image_dir = _split_path(
        "cityscapes", split, ("train", "val", "test"), lambda s: root / "leftImg8bit" / s, "folder"
    )
    suffix = "_leftImg8bit.png"
    images = sorted(image_dir.glob(f"*/*{suffix}"))
    _check_nonempty("cityscapes", split, images, f"<city>/*{suffix} images in {image_dir}")
    stems = [
        root / "gtFine" / split / image.parent.name / image.name[: -len(suffix)] for image in images
    ]
    train_ids = all(Path(f"{stem}_gtFine_labelTrainIds.png").is_file() for stem in stems)
    ending = "_gtFine_labelTrainIds.png" if train_ids else "_gtFine_labelIds.png"
    files = []
    for image, stem in zip(images, stems, strict=True):
        annotation = Path(f"{stem}{ending}")
        if not annotation.is_file():
            raise FileNotFoundError(
                f"image {image} has no annotation: expected {annotation} (labelTrainIds files "
                "are used only when every image of the split has one)"
            )
        files.append((image, annotation))
    if train_ids:
        label_map = _identity_map(len(CITYSCAPES_CLASSES))
        raw_values = [*range(len(CITYSCAPES_CLASSES)), IGNORE_INDEX]
    else:
        label_map = np.full(256, IGNORE_INDEX, dtype=np.int64)
        for label_id, train_id in CITYSCAPES_ID_TO_TRAIN_ID.items():
            label_map[label_id] = train_id
        raw_values = list(range(34))
    return SegmentationDataset(
        "cityscapes",
        split,
        root,
        files,
        CITYSCAPES_CLASSES,
        np.array(_CITYSCAPES_PALETTE),
        label_map,
        raw_values,
    )


def _listed_pairs(
    kind: str,
    split: str,
    root: Path,
    list_file: Path,
    pair_of: Callable[[str], tuple[Path, Path]],
) -> list[tuple[Path, Path]]:
    """The (image, annotation) pairs of a list of ids (or of 'IMAGE ANNOTATION' lines, paths
    relative to ``root``), each file checked."""
    files = []
    for fields in _read_list(list_file):
        if len(fields) == 1:
            image, annotation = pair_of(fields[0])
        else:
            image, annotation = (root / field.lstrip("/") for field in fields)
        if not image.is_file():
            raise FileNotFoundError(f"{list_file} lists {image}, which does not exist")
        if not annotation.is_file():
            raise _missing_annotation(image, annotation)
        files.append((image, annotation))
    _check_nonempty(kind, split, files, f"entries in {list_file}")
    return files


def _pascal_context(root: Path, split: str) -> SegmentationDataset:
    root = _find_root("pascal_context", root, ["VOC2010", "VOCdevkit/VOC2010"], "JPEGImages")
    lists = root / "ImageSets" / "SegmentationContext"
    list_file = _split_path(
        "pascal_context", split, ("train", "val"), lambda s: lists / f"{s}.txt", "list file"
    )
    mask_dir = root / "SegmentationClassContext"
    if not mask_dir.is_dir():
        raise FileNotFoundError(
            f"pascal_context annotations not found: expected folder {mask_dir} (60-value PNGs "
            "converted from the Context annotations, 0 = background)"
        )

    def pair_of(stem: str) -> tuple[Path, Path]:
        return root / "JPEGImages" / f"{stem}.jpg", mask_dir / f"{stem}.png"

    files = _listed_pairs("pascal_context", split, root, list_file, pair_of)
    return SegmentationDataset(
        "pascal_context",
        split,
        root,
        files,
        PASCAL_CONTEXT_CLASSES,
        np.array(_ADE20K_PALETTE[1:60]),
        _shift_map(60),
        np.arange(60),
    )


def _voc(root: Path, split: str) -> SegmentationDataset:
    root = _find_root("voc", root, ["VOC2012", "VOCdevkit/VOC2012"], "JPEGImages")
    lists = root / "ImageSets" / "Segmentation"
    mask_folder = "SegmentationClass"
    if split == "train_aug":
        mask_folder = "SegmentationClassAug"
        candidates = [lists / "train_aug.txt", lists / "aug.txt"]
        list_file = next((c for c in candidates if c.is_file()), None)
        if list_file is None or not (root / mask_folder).is_dir():
            raise FileNotFoundError(
                "voc split 'train_aug' needs the SBD augmentation: expected folder "
                f"{root / mask_folder} and list {candidates[0]} (or {candidates[1]})"
            )
    else:
        known = ("train", "val", "trainval", "train_aug")
        list_file = _split_path("voc", split, known, lambda s: lists / f"{s}.txt", "list file")
    mask_dir = root / mask_folder

    def pair_of(stem: str) -> tuple[Path, Path]:
        return root / "JPEGImages" / f"{stem}.jpg", mask_dir / f"{stem}.png"

    files = _listed_pairs("voc", split, root, list_file, pair_of)
    return SegmentationDataset(
        "voc",
        split,
        root,
        files,
        VOC_CLASSES,
        voc_palette(len(VOC_CLASSES)),
        _identity_map(len(VOC_CLASSES)),
        [*range(len(VOC_CLASSES)), IGNORE_INDEX],
    )


_SEGNET_PREFIX = "/SegNet/CamVid/"


def _camvid(root: Path, split: str) -> SegmentationDataset:
    splits = ("train", "val", "test")
    for candidate in (root, root / "CamVid"):
        if any((candidate / f"{name}annot").is_dir() for name in splits):
            root = candidate
            break
    else:
        raise FileNotFoundError(
            f"camvid data not found under {root}: expected {root / 'trainannot'} or "
            f"{root / 'CamVid' / 'trainannot'} (SegNet layout: train/, trainannot/, val/, "
            "valannot/, test/, testannot/)"
        )
    image_dir = _split_path("camvid", split, splits, lambda s: root / s, "folder")
    mask_dir = root / f"{split}annot"
    list_file = root / f"{split}.txt"
    files = []
    if list_file.is_file():
        for number, fields in enumerate(_read_list(list_file), start=1):
            if len(fields) != 2:
                raise ValueError(
                    f"{list_file}: entry {number}: expected 'IMAGE ANNOTATION', got {fields}"
                )
            image, annotation = (
                root / field[len(_SEGNET_PREFIX) :]
                if field.startswith(_SEGNET_PREFIX)
                else root / field.lstrip("/")
                for field in fields
            )
            if not image.is_file():
                raise FileNotFoundError(f"{list_file} lists {image}, which does not exist")
            if not annotation.is_file():
                raise _missing_annotation(image, annotation)
            files.append((image, annotation))
        _check_nonempty("camvid", split, files, f"entries in {list_file}")
    else:
        for image in _images_in(image_dir, IMAGE_SUFFIXES):
            annotation = mask_dir / image.name
            if not annotation.is_file():
                raise _missing_annotation(image, annotation)
            files.append((image, annotation))
        _check_nonempty("camvid", split, files, f"images in {image_dir}")
    return SegmentationDataset(
        "camvid",
        split,
        root,
        files,
        CAMVID_CLASSES,
        np.array(_CAMVID_PALETTE),
        _identity_map(len(CAMVID_CLASSES)),
        np.arange(len(CAMVID_CLASSES) + 1),
    )


_LAYOUTS: dict[str, Callable[[Path, str], SegmentationDataset]] = {
    "ade20k": _ade20k,
    "camvid": _camvid,
    "cityscapes": _cityscapes,
    "pascal_context": _pascal_context,
    "voc": _voc,
}

SEGMENTATION_KINDS = tuple(_LAYOUTS)


def open_segmentation(spec: str, split: str) -> SegmentationDataset:
    """Open a standard segmentation data set.

    Args:
        spec: ``"KIND:ROOT"``, ``KIND`` one of ``ade20k``, ``camvid``, ``cityscapes``,
            ``pascal_context``, ``voc`` (layouts in the module docstring).
        split: ``"train"`` or ``"val"`` for every kind; ``"test"`` for Cityscapes and
            CamVid; ``"trainval"`` and ``"train_aug"`` (SBD augmentation) for VOC.

    Returns:
        the split's :class:`SegmentationDataset`; files are listed and checked to exist
        now, read on access.
    """
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a str 'KIND:ROOT', got {type(spec).__name__}")
    if not isinstance(split, str):
        raise TypeError(f"split must be a str, got {type(split).__name__}")
    kind, _, root = spec.partition(":")
    if kind not in _LAYOUTS:
        raise ValueError(
            f"spec must be KIND:ROOT with KIND one of {', '.join(SEGMENTATION_KINDS)}, got {spec!r}"
        )
    if not root:
        raise ValueError(f"spec {spec!r} needs a data folder: {kind}:ROOT")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{kind} data folder not found: {path}")
    return _LAYOUTS[kind](path, split)
