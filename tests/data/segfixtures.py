"""Tiny copies of the standard segmentation layouts, for tests.

Each ``make_*`` function writes a few 64x96 images per split with masks made of 16x16
blocks of the raw annotation values listed in the matching ``*_RAW`` constant (every value
occurs in every mask), and returns the data-set folder (the ROOT of ``KIND:ROOT``). Image
pixels are a colour per raw value plus noise, so a model can learn something in a few steps.

Import with ``from tests.data.segfixtures import make_camvid`` (run pytest from the
repository root).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "ADE20K_RAW",
    "CAMVID_RAW",
    "CITYSCAPES_LABEL_IDS",
    "CITYSCAPES_TRAIN_IDS",
    "FIXTURE_SIZE",
    "PASCAL_CONTEXT_RAW",
    "VOC_RAW",
    "block_mask",
    "make_ade20k",
    "make_camvid",
    "make_cityscapes",
    "make_pascal_context",
    "make_voc",
]

FIXTURE_SIZE = (64, 96)  # (height, width)
BLOCK = 16

ADE20K_RAW = (0, 1, 2, 5, 13, 150)
CITYSCAPES_LABEL_IDS = (0, 7, 8, 11, 21, 23, 24, 26, 33)
# the official trainIds of CITYSCAPES_LABEL_IDS (0 -> 255 ignore)
CITYSCAPES_TRAIN_IDS = (255, 0, 1, 2, 8, 10, 11, 13, 18)
PASCAL_CONTEXT_RAW = (0, 1, 15, 30, 59)
VOC_RAW = (0, 1, 15, 20, 255)
CAMVID_RAW = (0, 1, 3, 4, 8, 11)

# images per split
_COUNTS = {"train": 4, "val": 2, "test": 2}


def block_mask(values: tuple[int, ...], index: int) -> np.ndarray:
    """uint8 ``FIXTURE_SIZE`` mask of 16x16 blocks cycling through ``values``, shifted by
    ``index`` so that images differ; every value occurs."""
    rows, cols = FIXTURE_SIZE[0] // BLOCK, FIXTURE_SIZE[1] // BLOCK
    cells = (np.arange(rows * cols) * 7 + index) % len(values)
    grid = np.asarray(values, dtype=np.uint8)[cells].reshape(rows, cols)
    return np.kron(grid, np.ones((BLOCK, BLOCK), dtype=np.uint8))


def _image(mask: np.ndarray, seed: int) -> np.ndarray:
    """uint8 RGB: a fixed colour per mask value plus uniform noise."""
    colours = np.random.default_rng(1234).integers(30, 226, size=(256, 3))
    noise = np.random.default_rng(seed).integers(-25, 26, size=(*mask.shape, 3))
    return np.clip(colours[mask] + noise, 0, 255).astype(np.uint8)


def _save(array: np.ndarray, path: Path, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if palette:
        image.putpalette(_voc_colours())  # an "L" image becomes "P", indices kept
    image.save(path)


def _voc_colours() -> list[int]:
    colours = []
    for index in range(256):
        code, colour = index, [0, 0, 0]
        for bit in range(7, -1, -1):
            for channel in range(3):
                colour[channel] |= ((code >> channel) & 1) << bit
            code >>= 3
        colours.extend(colour)
    return colours


def _pairs(values: tuple[int, ...], splits: tuple[str, ...]):
    """``(split, k, global index, mask, image)`` for every fixture sample."""
    index = 0
    for split in splits:
        for k in range(_COUNTS[split]):
            mask = block_mask(values, index)
            yield split, k, index, mask, _image(mask, index)
            index += 1


def make_ade20k(root: str | Path) -> Path:
    """``root/ADEChallengeData2016`` with ``images/{training,validation}/*.jpg`` and
    ``annotations/.../*.png`` holding :data:`ADE20K_RAW`."""
    base = Path(root) / "ADEChallengeData2016"
    folders = {"train": "training", "val": "validation"}
    for split, k, _, mask, image in _pairs(ADE20K_RAW, ("train", "val")):
        stem = f"ADE_{folders[split]}_{k:08d}"
        _save(image, base / "images" / folders[split] / f"{stem}.jpg")
        _save(mask, base / "annotations" / folders[split] / f"{stem}.png")
    return base


def make_cityscapes(root: str | Path, train_ids: bool = True) -> Path:
    """``root/cityscapes`` with ``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`` and
    ``gtFine/.../*_gtFine_labelIds.png`` holding :data:`CITYSCAPES_LABEL_IDS`; with
    ``train_ids`` also ``*_gtFine_labelTrainIds.png`` (the official conversion)."""
    base = Path(root) / "cityscapes"
    to_train = np.full(256, 255, dtype=np.uint8)
    to_train[list(CITYSCAPES_LABEL_IDS)] = CITYSCAPES_TRAIN_IDS
    for split, k, _, mask, image in _pairs(CITYSCAPES_LABEL_IDS, ("train", "val")):
        city = ("aachen", "bochum")[k % 2]
        stem = f"{city}_000000_{k:06d}"
        _save(image, base / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
        gt = base / "gtFine" / split / city
        _save(mask, gt / f"{stem}_gtFine_labelIds.png")
        if train_ids:
            _save(to_train[mask], gt / f"{stem}_gtFine_labelTrainIds.png")
    return base


def make_pascal_context(root: str | Path) -> Path:
    """``root/VOCdevkit/VOC2010`` with ``JPEGImages/*.jpg``, ``SegmentationClassContext/
    *.png`` holding :data:`PASCAL_CONTEXT_RAW` and ``ImageSets/SegmentationContext/
    {train,val}.txt``."""
    base = Path(root) / "VOCdevkit" / "VOC2010"
    ids: dict[str, list[str]] = {"train": [], "val": []}
    for split, _, index, mask, image in _pairs(PASCAL_CONTEXT_RAW, ("train", "val")):
        stem = f"2008_{index:06d}"
        ids[split].append(stem)
        _save(image, base / "JPEGImages" / f"{stem}.jpg")
        _save(mask, base / "SegmentationClassContext" / f"{stem}.png")
    lists = base / "ImageSets" / "SegmentationContext"
    lists.mkdir(parents=True, exist_ok=True)
    for split, stems in ids.items():
        (lists / f"{split}.txt").write_text("".join(f"{s}\n" for s in stems))
    return base


def make_voc(root: str | Path, aug: bool = False) -> Path:
    """``root/VOCdevkit/VOC2012`` with ``JPEGImages/*.jpg``, palette PNGs in
    ``SegmentationClass/`` holding :data:`VOC_RAW` and ``ImageSets/Segmentation/
    {train,val,trainval}.txt``; with ``aug`` also grey PNGs in ``SegmentationClassAug/`` for
    the train images plus two more, listed in ``train_aug.txt``."""
    base = Path(root) / "VOCdevkit" / "VOC2012"
    ids: dict[str, list[str]] = {"train": [], "val": []}
    for split, _, index, mask, image in _pairs(VOC_RAW, ("train", "val")):
        stem = f"2007_{index:06d}"
        ids[split].append(stem)
        _save(image, base / "JPEGImages" / f"{stem}.jpg")
        _save(mask, base / "SegmentationClass" / f"{stem}.png", palette=True)
        if aug and split == "train":
            _save(mask, base / "SegmentationClassAug" / f"{stem}.png")
    lists = base / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True, exist_ok=True)
    ids["trainval"] = ids["train"] + ids["val"]
    for split, stems in ids.items():
        (lists / f"{split}.txt").write_text("".join(f"{s}\n" for s in stems))
    if aug:
        extra = []
        for k in range(2):
            stem = f"2011_{k:06d}"
            mask = block_mask(VOC_RAW, 100 + k)
            _save(_image(mask, 100 + k), base / "JPEGImages" / f"{stem}.jpg")
            _save(mask, base / "SegmentationClassAug" / f"{stem}.png")
            extra.append(stem)
        stems = ids["train"] + extra
        (lists / "train_aug.txt").write_text("".join(f"{s}\n" for s in stems))
    return base


def make_camvid(root: str | Path) -> Path:
    """``root/CamVid`` in the SegNet layout: ``{train,val,test}/*.png`` with masks of
    :data:`CAMVID_RAW` in ``{split}annot/`` and ``{split}.txt`` lists of
    ``/SegNet/CamVid/...`` paths."""
    base = Path(root) / "CamVid"
    lines: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for split, _, index, mask, image in _pairs(CAMVID_RAW, ("train", "val", "test")):
        name = f"0001TP_{index:06d}.png"
        _save(image, base / split / name)
        _save(mask, base / f"{split}annot" / name)
        lines[split].append(f"/SegNet/CamVid/{split}/{name} /SegNet/CamVid/{split}annot/{name}")
    for split, entries in lines.items():
        (base / f"{split}.txt").write_text("".join(f"{e}\n" for e in entries))
    return base
