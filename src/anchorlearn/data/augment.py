"""Batch augmentations on tensors (kornia), on whatever device the batch lives.

All transforms take float images ``(B, C, H, W)`` with values in ``[0, 1]`` (augment before
normalising) and draw their randomness from torch's global generator, so they are
reproducible under ``torch.manual_seed``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import kornia.augmentation as K
import torch
from torch import nn

__all__ = [
    "SegmentationAugment",
    "TwoViewTransform",
    "classification_train_augment",
    "segmentation_train_augment",
    "ssl_augment",
]


def _size_pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        pair = (size, size)
    elif isinstance(size, Sequence) and len(size) == 2:
        pair = (int(size[0]), int(size[1]))
    else:
        raise TypeError(f"size must be an int or (height, width), got {size!r}")
    if min(pair) < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    return pair


def _check_images(images: torch.Tensor, name: str = "images") -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if not images.is_floating_point() or images.ndim != 4:
        raise TypeError(
            f"{name} must be a float tensor (B, C, H, W), got {images.dtype} {tuple(images.shape)}"
        )


class _Checked(nn.Module):
    """A kornia pipeline that checks its input and keeps the input dtype."""

    def __init__(self, pipeline: nn.Module) -> None:
        super().__init__()
        self.pipeline = pipeline

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)
        return self.pipeline(images).to(images.dtype)


def classification_train_augment(
    size: int | Sequence[int], padding: int | None = None
) -> nn.Module:
    """Pad-and-crop (``padding`` defaults to ``size // 8``, at least 1) and a horizontal
    flip, the usual CIFAR / Fashion-MNIST recipe.

    Returns:
        a module mapping float ``(B, C, H, W)`` to float ``(B, C, *size)``.
    """
    pair = _size_pair(size)
    pad = max(1, min(pair) // 8) if padding is None else padding
    return _Checked(nn.Sequential(K.RandomCrop(pair, padding=pad), K.RandomHorizontalFlip(p=0.5)))


def ssl_augment(size: int | Sequence[int], min_scale: float = 0.2) -> nn.Module:
    """The self-supervised view recipe (MoCo v2 style, without colour-only terms):
    random resized crop (area scale ``min_scale``-1; MoCo v2 uses 0.2), horizontal flip,
    brightness/contrast jitter (p = 0.8) and Gaussian blur (p = 0.5)."""
    pair = _size_pair(size)
    if not 0.0 < min_scale <= 1.0:
        raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
    return _Checked(
        nn.Sequential(
            K.RandomResizedCrop(pair, scale=(float(min_scale), 1.0)),
            K.RandomHorizontalFlip(p=0.5),
            K.ColorJitter(brightness=0.4, contrast=0.4, p=0.8),
            K.RandomGaussianBlur((3, 3), (0.1, 2.0), p=0.5),
        )
    )


class SegmentationAugment(nn.Module):
    """Joint image / mask augmentation: one geometric transform applied to both (masks
    resampled with nearest neighbour), photometric jitter to the image only.

    ``forward(images, masks)``: float ``(B, C, H, W)`` and integer ``(B, H, W)``; returns
    the pair with the masks' dtype kept and values still in the input label set.
    """

    def __init__(self, size: int | Sequence[int], scale: tuple[float, float] = (0.5, 1.0)) -> None:
        super().__init__()
        pair = _size_pair(size)
        self.pipeline = K.AugmentationSequential(
            K.RandomResizedCrop(pair, scale=scale, ratio=(0.75, 4 / 3)),
            K.RandomHorizontalFlip(p=0.5),
            K.ColorJitter(brightness=0.2, contrast=0.2, p=0.5),
            data_keys=["input", "mask"],
        )

    def forward(
        self, images: torch.Tensor, masks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check_images(images)
        if not isinstance(masks, torch.Tensor) or masks.is_floating_point() or masks.ndim != 3:
            raise TypeError(
                "masks must be an integer tensor (B, H, W), got "
                f"{getattr(masks, 'dtype', type(masks).__name__)} "
                f"{tuple(getattr(masks, 'shape', ()))}"
            )
        if masks.shape[0] != images.shape[0] or masks.shape[1:] != images.shape[2:]:
            raise ValueError(
                f"masks must have shape {(images.shape[0], *images.shape[2:])} to match "
                f"images {tuple(images.shape)}, got {tuple(masks.shape)}"
            )
        out_images, out_masks = self.pipeline(images, masks[:, None].float())
        return out_images.to(images.dtype), out_masks[:, 0].round().to(masks.dtype)


def segmentation_train_augment(size: int | Sequence[int]) -> SegmentationAugment:
    """Random resized crop (scale 0.5-1) and flip on image and mask, brightness/contrast
    jitter on the image."""
    return SegmentationAugment(size)


class TwoViewTransform(nn.Module):
    """Two independently augmented views of the same batch, for self-supervised learning.

    Args:
        first: transform of the first view.
        second: transform of the second view (defaults to ``first``; the two views still
            differ because every call draws new random parameters).
    """

    def __init__(
        self,
        first: Callable[[torch.Tensor], torch.Tensor],
        second: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.first = first
        self.second = first if second is None else second

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.first(images), self.second(images)
