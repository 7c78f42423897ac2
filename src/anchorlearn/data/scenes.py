"""Composited segmentation scenes: real content, synthetic layout.

No real segmentation data set is available offline, so scenes are composed from real
images: Fashion-MNIST items (their pixels above a threshold form the mask) are pasted,
at a random scale, position and colour tint, onto random crops of real photographs and
textures shipped with scikit-image (``skimage.data``) and scikit-learn
(``load_sample_images``). Each canvas holds one to ``max_items`` items whose classes are
drawn with a long-tailed frequency (exponential profile, class order fixed by the seed).

Mask values: 0 = background, item class ``k`` -> ``k + 1``, 255 = ignore (an optional
1-pixel band along the inside edge of every visible item region). Later items occlude
earlier ones. Train scenes take their items from the Fashion-MNIST train split, val scenes
from the test split, so the two never share an item image.

Generated scenes are deterministic from their parameters and cached as ``.npz`` under
``$ANCHORLEARN_CACHE/scenes`` (default ``${XDG_CACHE_HOME:-~/.cache}/anchorlearn/scenes``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from anchorlearn.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist
from anchorlearn.data.long_tail import profile_weights
from anchorlearn.data.sources import IGNORE_INDEX

__all__ = [
    "BACKGROUND_NAMES",
    "DEFAULT_THRESHOLD",
    "ItemPlacement",
    "SceneData",
    "background_images",
    "make_scenes",
    "render_scene",
    "scene_cache_dir",
    "scene_class_order",
]

DEFAULT_THRESHOLD = 30
# Bump when the generator changes, so that stale cache files are not reused.
_GENERATOR_VERSION = 1
_SKIMAGE_BACKGROUNDS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "brick",
    "grass",
    "gravel",
    "camera",
    "coins",
    "moon",
)
_SKLEARN_BACKGROUNDS = ("china", "flower")
BACKGROUND_NAMES: tuple[str, ...] = _SKIMAGE_BACKGROUNDS + _SKLEARN_BACKGROUNDS


@lru_cache(maxsize=1)
def background_images() -> tuple[np.ndarray, ...]:
    """The background photographs and textures as RGB uint8 ``(H, W, 3)`` arrays, in the
    order of :data:`BACKGROUND_NAMES`."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    images = [getattr(skimage.data, name)() for name in _SKIMAGE_BACKGROUNDS]
    images.extend(load_sample_images().images)
    rgb = []
    for image in images:
        image = np.asarray(image, dtype=np.uint8)
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        image = np.ascontiguousarray(image[:, :, :3])
        image.setflags(write=False)
        rgb.append(image)
    return tuple(rgb)


@dataclass(frozen=True)
class ItemPlacement:
    """One item to paste.

    Attributes:
        item: grey uint8 ``(h, w)``, already at its final scale; pixels above the
            threshold belong to the item.
        class_index: the item class ``k`` (written to the mask as ``k + 1``).
        top: row of the item's top-left corner on the canvas.
        left: column of the item's top-left corner.
        tint: RGB multipliers in ``[0, 1]`` applied to the grey item pixels.
    """

    item: np.ndarray
    class_index: int
    top: int
    left: int
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)


def render_scene(
    background: np.ndarray,
    placements: Sequence[ItemPlacement],
    threshold: int = DEFAULT_THRESHOLD,
    ignore_border: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Paste items onto a background, in order (later items occlude earlier ones).

    Args:
        background: RGB uint8 ``(H, W, 3)``, the canvas.
        placements: items with their positions; each must lie inside the canvas.
        threshold: item pixels ``> threshold`` are pasted and labelled.
        ignore_border: mark with 255 every item pixel that has a 4-neighbour of another
            label (a 1-pixel band along the inside edge of each visible item region).

    Returns:
        ``(image, mask)``: RGB uint8 ``(H, W, 3)`` and uint8 ``(H, W)``.
    """
    if background.dtype != np.uint8 or background.ndim != 3 or background.shape[2] != 3:
        raise ValueError(
            f"background must be RGB uint8 (H, W, 3), got {background.dtype} {background.shape}"
        )
    image = background.copy()
    height, width = image.shape[:2]
    mask = np.zeros((height, width), dtype=np.uint8)
    for i, p in enumerate(placements):
        h, w = p.item.shape
        if p.top < 0 or p.left < 0 or p.top + h > height or p.left + w > width:
            raise ValueError(
                f"placements[{i}]: item of size {h}x{w} at (top={p.top}, left={p.left}) must "
                f"lie inside the {height}x{width} canvas"
            )
        if not 0 <= p.class_index < IGNORE_INDEX - 1:
            raise ValueError(
                f"placements[{i}].class_index must be in [0, {IGNORE_INDEX - 1}), "
                f"got {p.class_index}"
            )
        foreground = p.item > threshold
        colour = np.clip(np.rint(p.item[:, :, None] * np.asarray(p.tint)), 0, 255)
        region = image[p.top : p.top + h, p.left : p.left + w]
        region[foreground] = colour[foreground].astype(np.uint8)
        mask[p.top : p.top + h, p.left : p.left + w][foreground] = p.class_index + 1
    if ignore_border:
        padded = np.pad(mask, 1, mode="edge")
        differs = np.zeros_like(mask, dtype=bool)
        for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
            differs |= padded[dy : dy + height, dx : dx + width] != mask
        mask[differs & (mask > 0)] = IGNORE_INDEX
    return image, mask


@dataclass
class SceneData:
    """Composited scenes.

    Attributes:
        images: RGB uint8 ``(N, H, W, 3)``.
        masks: uint8 ``(N, H, W)``: 0 background, ``k + 1`` item class ``k``, 255 ignore.
        class_names: ``["background", <item class names>]``.
        item_counts: int64 ``(num_item_classes,)``, items pasted per item class (before
            occlusion).
    """

    images: np.ndarray
    masks: np.ndarray
    class_names: list[str]
    item_counts: np.ndarray

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def scene_class_order(num_item_classes: int, seed: int) -> np.ndarray:
    """Item classes from most to least frequent, as drawn from ``seed`` (the same for the
    train and val splits)."""
    return np.random.default_rng(seed).permutation(num_item_classes)


def scene_cache_dir() -> Path:
    """``$ANCHORLEARN_CACHE/scenes``, else ``${XDG_CACHE_HOME:-~/.cache}/anchorlearn/scenes``."""
    env = os.environ.get("ANCHORLEARN_CACHE")
    if env:
        return Path(env) / "scenes"
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache_home / "anchorlearn" / "scenes"


def _random_background(rng: np.random.Generator, canvas: int) -> np.ndarray:
    backgrounds = background_images()
    source = backgrounds[int(rng.integers(len(backgrounds)))]
    height, width = source.shape[:2]
    crop = int(rng.integers(canvas, max(canvas, min(height, width) // 2) + 1))
    top = int(rng.integers(height - crop + 1))
    left = int(rng.integers(width - crop + 1))
    patch = Image.fromarray(source[top : top + crop, left : left + crop])
    patch = np.asarray(patch.resize((canvas, canvas), Image.Resampling.BILINEAR))
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    return np.ascontiguousarray(patch)


def _generate(
    num_scenes: int,
    split: str,
    canvas: int,
    max_items: int,
    num_item_classes: int,
    imbalance_ratio: float,
    ignore_border: bool,
    seed: int,
    threshold: int,
    item_scale: tuple[float, float],
    data_root: str | os.PathLike[str] | None,
) -> SceneData:
    items, labels = load_fashion_mnist("train" if split == "train" else "test", data_root)
    pools = [np.flatnonzero(labels == k) for k in range(num_item_classes)]
    order = scene_class_order(num_item_classes, seed)
    probs = np.empty(num_item_classes)
    probs[order] = profile_weights(num_item_classes, imbalance_ratio, "exp")
    probs /= probs.sum()
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    images = np.empty((num_scenes, canvas, canvas, 3), dtype=np.uint8)
    masks = np.empty((num_scenes, canvas, canvas), dtype=np.uint8)
    item_counts = np.zeros(num_item_classes, dtype=np.int64)
    for s in range(num_scenes):
        background = _random_background(rng, canvas)
        classes = rng.choice(num_item_classes, size=int(rng.integers(1, max_items + 1)), p=probs)
        placements = []
        for k in classes:
            item = items[pools[k][int(rng.integers(len(pools[k])))]]
            size = min(canvas, round(item.shape[0] * rng.uniform(*item_scale)))
            scaled = np.asarray(
                Image.fromarray(item).resize((size, size), Image.Resampling.BILINEAR)
            )
            placements.append(
                ItemPlacement(
                    item=scaled,
                    class_index=int(k),
                    top=int(rng.integers(canvas - size + 1)),
                    left=int(rng.integers(canvas - size + 1)),
                    tint=tuple(float(t) for t in rng.uniform(0.55, 1.0, size=3)),
                )
            )
            item_counts[k] += 1
        images[s], masks[s] = render_scene(background, placements, threshold, ignore_border)
    names = ["background", *FASHION_MNIST_CLASSES[:num_item_classes]]
    return SceneData(images, masks, names, item_counts)


def make_scenes(
    num_scenes: int,
    split: str = "train",
    canvas: int = 64,
    max_items: int = 4,
    num_item_classes: int = 10,
    imbalance_ratio: float = 10,
    ignore_border: bool = True,
    seed: int = 0,
    threshold: int = DEFAULT_THRESHOLD,
    item_scale: tuple[float, float] = (0.8, 1.6),
    data_root: str | os.PathLike[str] | None = None,
    cache: bool = True,
) -> SceneData:
    """Generate (or load from the disk cache) composited segmentation scenes.

    Args:
        num_scenes: number of scenes ``N``.
        split: ``"train"`` (items from the Fashion-MNIST train split) or ``"val"`` (items
            from the test split).
        canvas: side of the square canvas, in pixels.
        max_items: each scene holds ``1 .. max_items`` items, uniformly.
        num_item_classes: the first ``K <= 10`` Fashion-MNIST classes are used; masks have
            ``K + 1`` classes.
        imbalance_ratio: item class frequencies follow the exponential profile
            ``IR^(-r / (K - 1))`` by rank ``r`` (:func:`scene_class_order`).
        ignore_border: 1-pixel ignore band (255) along item edges (:func:`render_scene`).
        seed: fixes the class order and every random choice.
        threshold: Fashion-MNIST pixels ``> threshold`` form an item's mask.
        item_scale: range of the random item scale relative to 28 pixels (capped at the
            canvas).
        data_root: Fashion-MNIST directory (see :func:`load_fashion_mnist`).
        cache: read and write the ``.npz`` cache (:func:`scene_cache_dir`).
    """
    for name, value, low in (
        ("num_scenes", num_scenes, 1),
        ("canvas", canvas, 8),
        ("max_items", max_items, 1),
        ("num_item_classes", num_item_classes, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if num_item_classes > len(FASHION_MNIST_CLASSES):
        raise ValueError(
            f"num_item_classes must be <= {len(FASHION_MNIST_CLASSES)}, got {num_item_classes}"
        )
    if not 0 <= threshold < 255:
        raise ValueError(f"threshold must be in [0, 255), got {threshold!r}")
    if not 0 < item_scale[0] <= item_scale[1]:
        raise ValueError(f"item_scale must be (low, high) with 0 < low <= high, got {item_scale}")
    params = {
        "num_scenes": num_scenes,
        "split": split,
        "canvas": canvas,
        "max_items": max_items,
        "num_item_classes": num_item_classes,
        "imbalance_ratio": float(imbalance_ratio),
        "ignore_border": bool(ignore_border),
        "seed": int(seed),
        "threshold": int(threshold),
        "item_scale": [float(item_scale[0]), float(item_scale[1])],
        "version": _GENERATOR_VERSION,
    }
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    path = scene_cache_dir() / f"scenes_{split}_{num_scenes}x{canvas}_{digest}.npz"
    names = ["background", *FASHION_MNIST_CLASSES[:num_item_classes]]
    if cache and path.is_file():
        with np.load(path) as npz:
            return SceneData(npz["images"], npz["masks"], names, npz["item_counts"])
    data = _generate(
        num_scenes,
        split,
        canvas,
        max_items,
        num_item_classes,
        imbalance_ratio,
        ignore_border,
        seed,
        int(threshold),
        (float(item_scale[0]), float(item_scale[1])),
        data_root,
    )
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        np.savez_compressed(tmp, images=data.images, masks=data.masks, item_counts=data.item_counts)
        os.replace(tmp, path)
    return data
