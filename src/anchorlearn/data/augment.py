"""Batch augmentations on tensors (kornia), on whatever device the batch lives.

All transforms take float images ``(B, C, H, W)`` with values in ``[0, 1]`` (augment before
normalising) and draw their randomness from torch's global generator, so they are
reproducible under ``torch.manual_seed``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "TONE_OPS",
    "SegmentationAugment",
    "StrongAugment",
    "TwoViewTransform",
    "classification_train_augment",
    "segmentation_train_augment",
    "ssl_augment",
    "strong_augment",
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


# the photometric operations StrongAugment picks one of per image (uniformly at random)
TONE_OPS = ("identity", "autocontrast", "equalize", "posterize", "solarize")


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    """Stretch every image channel to span ``[0, 1]`` (a constant channel is kept)."""
    low = x.amin(dim=(2, 3), keepdim=True)
    high = x.amax(dim=(2, 3), keepdim=True)
    span = high - low
    return torch.where(span > 0, (x - low) / span.clamp_min(1e-12), x)


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation of every image channel on 256 grey levels: each pixel becomes
    the fraction of the channel's pixels darker than or as dark as it, rescaled so that the
    darkest level maps to 0 (as PIL's ``ImageOps.equalize``; a constant channel is kept)."""
    b, c, h, w = x.shape
    levels = (x * 255).round().clamp(0, 255).long().reshape(b, c, h * w)
    hist = torch.zeros(b, c, 256, dtype=x.dtype, device=x.device)
    hist.scatter_add_(2, levels, torch.ones_like(levels, dtype=x.dtype))
    cdf = hist.cumsum(2)
    # the count of the darkest level present: cdf at the first non-empty bin
    first = torch.where(hist > 0, cdf, torch.full_like(cdf, float(h * w))).amin(2, keepdim=True)
    span = float(h * w) - first
    equalized = (cdf - first) / span.clamp_min(1)
    out = equalized.gather(2, levels).reshape(b, c, h, w)
    return torch.where((span > 0)[..., None], out, x)


class StrongAugment(nn.Module):
    """A RandAugment-like strong augmentation with Cutout, random per image, for the strong
    view of semi-supervised consistency training (Sohn et al. 2020, FixMatch, NeurIPS).

    Every image of the batch draws its own parameters, in this order:

    1. an affine warp (``affine_grid`` / ``grid_sample``, bilinear, zero outside the image)
       about the image centre: rotation uniform in ``+-max_rotation`` degrees, shears along
       x and y uniform in ``+-max_shear``, translation uniform in ``+-max_translate`` of the
       width and of the height;
    2. brightness (``x * b``) then contrast (``m + c (x - m)``, ``m`` the image's mean),
       ``b`` and ``c`` uniform in ``brightness`` and ``contrast``;
    3. one of :data:`TONE_OPS`, picked uniformly: none, autocontrast (each channel
       stretched to ``[0, 1]``), histogram equalisation (256 levels), posterisation to
       4-8 bits, or solarisation (pixels at or above a threshold uniform in ``[0.5, 1)``
       inverted);
    4. Cutout: a ``cutout * H`` by ``cutout * W`` rectangle (a square for square images)
       centred uniformly in the image, clipped at its edges, set to ``cutout_fill``.

    Values are clamped to ``[0, 1]`` after each step. The parameters are drawn on the CPU
    from torch's global generator (so ``torch.manual_seed`` reproduces them whatever the
    images' device) and the images are transformed where they live, in float32 (float64
    for float64 input); the output has the input's shape and dtype.

    Args:
        size: the ``(height, width)`` (or side) of the images it is given.
    """

    def __init__(
        self,
        size: int | Sequence[int],
        *,
        max_rotation: float = 30.0,
        max_shear: float = 0.3,
        max_translate: float = 0.25,
        brightness: tuple[float, float] = (0.5, 1.5),
        contrast: tuple[float, float] = (0.5, 1.5),
        cutout: float = 0.5,
        cutout_fill: float = 0.5,
    ) -> None:
        super().__init__()
        self.size = _size_pair(size)
        for name, value in (
            ("max_rotation", max_rotation),
            ("max_shear", max_shear),
            ("max_translate", max_translate),
        ):
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name, pair in (("brightness", brightness), ("contrast", contrast)):
            if len(pair) != 2 or not 0 <= pair[0] <= pair[1]:
                raise ValueError(f"{name} must be (low, high) with 0 <= low <= high, got {pair!r}")
        if not 0 <= cutout <= 1:
            raise ValueError(f"cutout must lie in [0, 1] (a fraction of the size), got {cutout!r}")
        if not 0 <= cutout_fill <= 1:
            raise ValueError(f"cutout_fill must lie in [0, 1], got {cutout_fill!r}")
        self.max_rotation = float(max_rotation)
        self.max_shear = float(max_shear)
        self.max_translate = float(max_translate)
        self.brightness = (float(brightness[0]), float(brightness[1]))
        self.contrast = (float(contrast[0]), float(contrast[1]))
        self.cutout = float(cutout)
        self.cutout_fill = float(cutout_fill)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)
        if tuple(images.shape[2:]) != self.size:
            raise ValueError(
                f"images must be {self.size[0]}x{self.size[1]} (the size StrongAugment was "
                f"built for), got {tuple(images.shape)}"
            )
        b = images.shape[0]
        # every random number of the batch, drawn at once on the CPU: one row per image
        u = torch.rand(b, 11, dtype=torch.float64)
        dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
        x = images.to(dtype)
        x = self._affine(x, u[:, :5])
        x = self._brightness_contrast(x, u[:, 5:7])
        x = self._tone(x, u[:, 7:9])
        x = self._cutout(x, u[:, 9:11])
        return x.to(images.dtype)

    def _affine(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Rotation, shear and translation; ``u`` ``(B, 5)`` uniform in ``[0, 1)``."""
        h, w = self.size
        angle = torch.deg2rad((2 * u[:, 0] - 1) * self.max_rotation)
        shear_x = (2 * u[:, 1] - 1) * self.max_shear
        shear_y = (2 * u[:, 2] - 1) * self.max_shear
        cos, sin = torch.cos(angle), torch.sin(angle)
        rotation = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
        ones = torch.ones_like(shear_x)
        shear = torch.stack([torch.stack([ones, shear_x], 1), torch.stack([shear_y, ones], 1)], 1)
        pixels = rotation @ shear  # (B, 2, 2) on centred pixel coordinates (x, y)
        # affine_grid works on coordinates normalised to [-1, 1] along each side
        half = torch.tensor([w / 2.0, h / 2.0], dtype=torch.float64)
        linear = pixels * half[None, None, :] / half[None, :, None]
        shift = (2 * torch.stack([u[:, 3], u[:, 4]], 1) - 1) * self.max_translate * 2
        theta = torch.cat([linear, shift[:, :, None]], 2).to(x.device, x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return warped.clamp(0, 1)

    def _brightness_contrast(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        low, high = self.brightness
        bright = (low + (high - low) * u[:, 0]).to(x.device, x.dtype)[:, None, None, None]
        x = (x * bright).clamp(0, 1)
        low, high = self.contrast
        factor = (low + (high - low) * u[:, 1]).to(x.device, x.dtype)[:, None, None, None]
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (mean + factor * (x - mean)).clamp(0, 1)

    def _tone(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """One of :data:`TONE_OPS` per image: ``u[:, 0]`` picks it, ``u[:, 1]`` sets its
        strength (posterise bits, solarise threshold)."""
        pick = (u[:, 0] * len(TONE_OPS)).long().clamp_max(len(TONE_OPS) - 1).to(x.device)
        bits = 4 + (u[:, 1] * 5).long().clamp_max(4)  # 4..8
        step = (2.0 ** (8 - bits)).to(x.device, x.dtype)[:, None, None, None]
        threshold = (0.5 + 0.5 * u[:, 1]).to(x.device, x.dtype)[:, None, None, None]
        candidates = {
            "autocontrast": lambda: _autocontrast(x),
            "equalize": lambda: _equalize(x),
            "posterize": lambda: (
                torch.div((x * 255).round(), step, rounding_mode="floor") * step / 255
            ),
            "solarize": lambda: torch.where(x >= threshold, 1 - x, x),
        }
        out = x
        for index, name in enumerate(TONE_OPS):
            chosen = pick == index
            if name == "identity" or not bool(chosen.any()):
                continue
            out = torch.where(chosen[:, None, None, None], candidates[name](), out)
        return out.clamp(0, 1)

    def _cutout(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        h, w = self.size
        side_h, side_w = round(self.cutout * h), round(self.cutout * w)
        if side_h == 0 or side_w == 0:
            return x
        top = (u[:, 0] * h).long() - side_h // 2
        left = (u[:, 1] * w).long() - side_w // 2
        rows = torch.arange(h)[None, :]
        cols = torch.arange(w)[None, :]
        in_rows = (rows >= top[:, None]) & (rows < (top + side_h)[:, None])
        in_cols = (cols >= left[:, None]) & (cols < (left + side_w)[:, None])
        box = (in_rows[:, :, None] & in_cols[:, None, :]).to(x.device)
        return torch.where(box[:, None], torch.full_like(x, self.cutout_fill), x)

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, max_rotation={self.max_rotation}, max_shear={self.max_shear}, "
            f"max_translate={self.max_translate}, brightness={self.brightness}, "
            f"contrast={self.contrast}, cutout={self.cutout}, cutout_fill={self.cutout_fill}"
        )


def strong_augment(size: int | Sequence[int], **kwargs: float) -> StrongAugment:
    """The strong view of FixMatch-style training (Sohn et al. 2020, FixMatch, NeurIPS):
    :class:`StrongAugment` for images of ``size`` (random affine, brightness / contrast, one
    of autocontrast / equalise / posterise / solarise, Cutout of half the side); ``kwargs``
    change its ranges."""
    return StrongAugment(size, **kwargs)
