"""Tiny CIFAR-10 trees in both layouts users have: the official python batches and
``train/`` + ``test/`` class folders of image files. Pixel values encode the class (the red
channel's mean rises with it), so a model can learn them in a few steps."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from anchorlearn.data.cifar import CIFAR10_CLASSES

__all__ = ["cifar_arrays", "make_cifar_batches", "make_cifar_folders"]


def cifar_arrays(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 ``(10 * per_class, 32, 32, 3)`` images and their labels, class-major."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), per_class)
    images = rng.integers(0, 60, size=(len(labels), 32, 32, 3)).astype(np.uint8)
    images[..., 0] += (labels * 19).astype(np.uint8)[:, None, None]
    return images, labels


def _dump(path: Path, payload: dict) -> None:
    # the official files are protocol-2 pickles with bytes keys
    with path.open("wb") as f:
        pickle.dump(payload, f, protocol=2)


def make_cifar_batches(root: Path, per_class: int = 5, nested: bool = True) -> Path:
    """``root[/cifar-10-batches-py]/data_batch_1..5, test_batch, batches.meta`` with
    ``per_class`` training images per class in every batch and per test class; returns
    ``root``."""
    folder = root / "cifar-10-batches-py" if nested else root
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        images, labels = cifar_arrays(per_class, seed=i)
        data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # planes R, G, B
        _dump(
            folder / f"data_batch_{i}",
            {b"batch_label": b"batch", b"labels": labels.tolist(), b"data": data},
        )
    images, labels = cifar_arrays(per_class, seed=0)
    data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    _dump(folder / "test_batch", {b"labels": labels.tolist(), b"data": data})
    _dump(
        folder / "batches.meta",
        {b"label_names": [n.encode() for n in CIFAR10_CLASSES], b"num_vis": 3072},
    )
    return root


def make_cifar_folders(root: Path, per_class: int = 6, test_per_class: int = 3) -> Path:
    """``root/{train,test}/<class>/NNNN.png`` (lossless, so the pixels survive); returns
    ``root``."""
    for split, count, seed in (("train", per_class, 1), ("test", test_per_class, 2)):
        images, labels = cifar_arrays(count, seed)
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = root / split / CIFAR10_CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:04d}.png")
    return root
