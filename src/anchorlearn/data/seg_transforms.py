"""Segmentation training transforms.

:class:`RandomRescaleCrop` and :class:`ResizeToScale` work on one numpy sample with PIL
only, so they run in ``DataLoader`` workers; their randomness comes from a
``numpy.random.Generator`` passed per call. :class:`PhotometricDistortion` works on a
batch of float tensors on any device (kornia), after the batch has been moved there.

The recipe is the usual one for ADE20K / Cityscapes / Pascal-Context training: random
rescale by a ratio in ``[0.5, 2]`` of a base size keeping the aspect ratio, random crop
whose largest class covers less than 75 % of the labelled pixels, horizontal flip, padding
to the crop size, then photometric distortion.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from anchorlearn._checks import check_non_negative, check_probability

__all__ = [
    "PhotometricDistortion",
    "RandomRescaleCrop",
    "ResizeToScale",
    "StrongPhotometric",
    "cutout_boxes",
    "keep_ratio_size",
]

_CROP_RETRIES = 10


def _size_pair(value: object, name: str) -> tuple[int, int]:
    """An int ``n`` as ``(n, n)`` or a pair of ints, each >= 1."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        pair = (int(value), int(value))
    elif (
        isinstance(value, Sequence)
        and len(value) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)
    ):
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return pair


def keep_ratio_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """The size ``(h, w)`` an image of ``height x width`` takes when rescaled, aspect ratio
    kept, to fit ``scale``: its long edge at most ``max(scale)`` and its short edge at most
    ``min(scale)``, one of the two reached.

    factor = ``min(max(scale) / max(height, width), min(scale) / min(height, width))``;
    each side is ``round(side * factor)`` (halves up), at least 1.
    """
    long_side, short_side = max(scale), min(scale)
    factor = min(long_side / max(height, width), short_side / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def _check_sample(image: object, mask: object | None) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise TypeError(
            f"image must be a uint8 numpy array (H, W, 3), got "
            f"{getattr(image, 'dtype', type(image).__name__)}"
        )
    if image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(f"image must have shape (H, W, 3), got {image.shape}")
    if mask is None:
        return
    if not isinstance(mask, np.ndarray) or not np.issubdtype(mask.dtype, np.integer):
        raise TypeError(
            f"mask must be an integer numpy array (H, W), got "
            f"{getattr(mask, 'dtype', type(mask).__name__)}"
        )
    if mask.shape != image.shape[:2]:
        raise ValueError(
            f"mask must have shape {image.shape[:2]} to match image {image.shape}, got {mask.shape}"
        )


def _resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of uint8 ``(H, W, 3)`` to ``size`` = ``(h, w)``."""
    if image.shape[:2] == size:
        return image
    resized = Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of ``(H, W)`` to ``size``: output pixel ``i`` takes input
    pixel ``floor((i + 0.5) * H / h)``, so no value is invented."""
    height, width = mask.shape
    if (height, width) == size:
        return mask
    rows = np.minimum(
        ((np.arange(size[0]) + 0.5) * (height / size[0])).astype(np.int64), height - 1
    )
    cols = np.minimum(((np.arange(size[1]) + 0.5) * (width / size[1])).astype(np.int64), width - 1)
    return mask[rows[:, None], cols[None, :]]


class ResizeToScale:
    """Rescale keeping the aspect ratio to fit ``base_size`` (:func:`keep_ratio_size`), as
    in evaluation pipelines: image bilinear, mask (optional) nearest.

    Args:
        base_size: an int ``n`` (long edge ``n``) or a pair whose larger value bounds the
            long edge and smaller value the short edge, e.g. ``(2048, 512)``.
    """

    def __init__(self, base_size: int | tuple[int, int]) -> None:
        self.base_size = _size_pair(base_size, "base_size")

    def __repr__(self) -> str:
        return f"ResizeToScale(base_size={self.base_size})"

    def __call__(
        self, image: np.ndarray, mask: np.ndarray | None = None
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """``image`` uint8 ``(H, W, 3)`` -> ``(h, w, 3)``; with ``mask`` integer ``(H, W)``,
        returns ``(image, mask)`` with the mask as int64 ``(h, w)``."""
        _check_sample(image, mask)
        size = keep_ratio_size(image.shape[0], image.shape[1], self.base_size)
        resized = _resize_image(image, size)
        if mask is None:
            return resized
        return resized, _resize_mask(mask, size).astype(np.int64)


class RandomRescaleCrop:
    """Random keep-ratio rescale, random crop with a cap on the largest class, horizontal
    flip and padding: one training sample in, one ``crop_size`` sample out.

    Steps, each drawing from the ``rng`` passed to the call in this order:

    1. ratio ``r ~ U(ratio_range)``; the image is rescaled to
       ``keep_ratio_size(H, W, (int(r * L), int(r * S)))`` where ``(L, S)`` are the long and
       short sides of ``base_size`` (``None``: the image's own size), image bilinear, mask
       nearest.
    2. a crop of ``crop_size`` (smaller where the image is smaller) at a uniform offset; with
       ``cat_max_ratio < 1`` it is drawn again, up to 10 times, until it holds more than one
       class and the largest class covers less than ``cat_max_ratio`` of its labelled
       (not ignore) pixels.
    3. with ``flip``, a horizontal flip with probability 0.5.
    4. padding at the bottom and right to ``crop_size``: ``pad_value`` in the image,
       ``ignore_index`` in the mask.

    Args:
        crop_size: an int or ``(height, width)``.
        base_size: ``None``, an int or a pair (long and short side bounds, in any order).
        ratio_range: ``(low, high)`` with ``0 < low <= high``.
        cat_max_ratio: in ``(0, 1]``; 1 turns the class cap off.
        flip: draw a horizontal flip.
        ignore_index: the mask value of ignored and padded pixels.
        pad_value: the image value of padded pixels, 0..255.
    """

    def __init__(
        self,
        crop_size: int | tuple[int, int],
        base_size: int | tuple[int, int] | None = None,
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        flip: bool = True,
        ignore_index: int = 255,
        pad_value: int = 0,
    ) -> None:
        self.crop_size = _size_pair(crop_size, "crop_size")
        self.base_size = None if base_size is None else _size_pair(base_size, "base_size")
        if (
            not isinstance(ratio_range, Sequence)
            or len(ratio_range) != 2
            or not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in ratio_range)
        ):
            raise TypeError(
                f"ratio_range must be a pair of numbers (low, high), got {ratio_range!r}"
            )
        low, high = float(ratio_range[0]), float(ratio_range[1])
        if not 0.0 < low <= high < float("inf"):
            raise ValueError(f"ratio_range must satisfy 0 < low <= high, got {ratio_range!r}")
        self.ratio_range = (low, high)
        if isinstance(cat_max_ratio, bool) or not isinstance(cat_max_ratio, (int, float)):
            raise TypeError(f"cat_max_ratio must be a number, got {type(cat_max_ratio).__name__}")
        if not 0.0 < cat_max_ratio <= 1.0:
            raise ValueError(f"cat_max_ratio must lie in (0, 1], got {cat_max_ratio}")
        self.cat_max_ratio = float(cat_max_ratio)
        if not isinstance(flip, bool):
            raise TypeError(f"flip must be a bool, got {type(flip).__name__}")
        self.flip = flip
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        self.ignore_index = ignore_index
        if isinstance(pad_value, bool) or not isinstance(pad_value, int):
            raise TypeError(f"pad_value must be an int, got {type(pad_value).__name__}")
        if not 0 <= pad_value <= 255:
            raise ValueError(f"pad_value must lie in 0..255, got {pad_value}")
        self.pad_value = pad_value

    def __repr__(self) -> str:
        return (
            f"RandomRescaleCrop(crop_size={self.crop_size}, base_size={self.base_size}, "
            f"ratio_range={self.ratio_range}, cat_max_ratio={self.cat_max_ratio}, "
            f"flip={self.flip}, ignore_index={self.ignore_index}, pad_value={self.pad_value})"
        )

    def rescaled_size(self, height: int, width: int, ratio: float) -> tuple[int, int]:
        """The size ``(h, w)`` step 1 gives an image of ``height x width`` for ratio ``r``."""
        long_side, short_side = (
            (max(height, width), min(height, width))
            if self.base_size is None
            else (max(self.base_size), min(self.base_size))
        )
        scale = (max(1, int(long_side * ratio)), max(1, int(short_side * ratio)))
        return keep_ratio_size(height, width, scale)

    def _offset(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int]:
        top = int(rng.integers(0, max(height - self.crop_size[0], 0) + 1))
        left = int(rng.integers(0, max(width - self.crop_size[1], 0) + 1))
        return top, left

    def _acceptable(self, crop: np.ndarray) -> bool:
        """More than one class, the largest under ``cat_max_ratio`` of the labelled pixels."""
        values, counts = np.unique(crop, return_counts=True)
        counts = counts[values != self.ignore_index]
        return len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio

    def __call__(
        self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """``image`` uint8 ``(H, W, 3)`` and integer ``mask`` ``(H, W)`` -> uint8
        ``(*crop_size, 3)`` and int64 ``crop_size``."""
        image, mask, _ = self.crop(image, mask, rng)
        return image, mask

    def crop(
        self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        """:meth:`__call__` plus the ``(height, width)`` of the crop's image content: the
        rest, at the bottom and right, is padding (for a pipeline that pads normalised
        images with 0 instead, as mmsegmentation does)."""
        _check_sample(image, mask)
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        ratio = float(rng.uniform(*self.ratio_range))
        size = self.rescaled_size(image.shape[0], image.shape[1], ratio)
        image, mask = _resize_image(image, size), _resize_mask(mask, size)

        crop_h, crop_w = self.crop_size
        top, left = self._offset(size[0], size[1], rng)
        if self.cat_max_ratio < 1.0:
            for _ in range(_CROP_RETRIES):
                if self._acceptable(mask[top : top + crop_h, left : left + crop_w]):
                    break
                top, left = self._offset(size[0], size[1], rng)
        image = image[top : top + crop_h, left : left + crop_w]
        mask = mask[top : top + crop_h, left : left + crop_w]

        if self.flip and rng.random() < 0.5:
            image, mask = image[:, ::-1], mask[:, ::-1]

        out_image = np.full((crop_h, crop_w, 3), self.pad_value, dtype=np.uint8)
        out_mask = np.full((crop_h, crop_w), self.ignore_index, dtype=np.int64)
        out_image[: image.shape[0], : image.shape[1]] = image
        out_mask[: mask.shape[0], : mask.shape[1]] = mask
        return out_image, out_mask, (image.shape[0], image.shape[1])


def _check_rgb_batch(images: object) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if not images.is_floating_point() or images.ndim != 4 or images.shape[1] != 3:
        raise TypeError(
            f"images must be a float tensor (B, 3, H, W), got {images.dtype} {tuple(images.shape)}"
        )


class PhotometricDistortion(nn.Module):
    """Random brightness, contrast, saturation and hue changes of a batch, each applied to
    each image with probability ``p`` (parameters drawn per image), from torch's global
    generator.

    Order per batch: brightness, then contrast either before saturation and hue or after
    them (probability 0.5 each), as in mmsegmentation's ``PhotoMetricDistortion``.

    Args:
        brightness_delta: an offset drawn from ``U(-delta, delta)`` is added (0-1 scale;
            32/255 matches a delta of 32 on 0-255 pixels).
        contrast_range: a factor drawn from this range multiplies the pixels.
        saturation_range: a factor drawn from this range multiplies the HSV saturation.
        hue_delta: degrees; a hue rotation drawn from ``U(-hue_delta, hue_delta)``. The
            default, 36, is mmsegmentation's ``hue_delta=18`` (OpenCV hue units, 0-180).
        p: probability of each of the four changes.

    ``forward(images)``: float ``(B, 3, H, W)`` in ``[0, 1]`` -> the same shape and dtype,
    values in ``[0, 1]``.
    """

    def __init__(
        self,
        brightness_delta: float = 32 / 255,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
        hue_delta: float = 36.0,
        p: float = 0.5,
    ) -> None:
        super().__init__()
        # imported here: DataLoader workers import this module for the numpy transforms
        import kornia.augmentation as K

        check_probability(brightness_delta, "brightness_delta")
        for name, pair in (
            ("contrast_range", contrast_range),
            ("saturation_range", saturation_range),
        ):
            if not isinstance(pair, tuple | list) or len(pair) != 2:
                raise TypeError(f"{name} must be a pair (low, high), got {pair!r}")
            low, high = pair
            if not 0.0 <= low <= high:
                raise ValueError(f"{name} must satisfy 0 <= low <= high, got {(low, high)}")
        if not 0.0 <= check_non_negative(hue_delta, "hue_delta") <= 180.0:
            raise ValueError(f"hue_delta must lie in [0, 180] degrees, got {hue_delta}")
        check_probability(p, "p")
        self.brightness = K.RandomBrightness((1.0 - brightness_delta, 1.0 + brightness_delta), p=p)
        self.contrast = K.RandomContrast(tuple(contrast_range), p=p)
        self.saturation = K.RandomSaturation(tuple(saturation_range), p=p)
        self.hue = K.RandomHue((-hue_delta / 360.0, hue_delta / 360.0), p=p)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_rgb_batch(images)
        contrast_first = bool(torch.rand(()) < 0.5)
        out = self.brightness(images)
        if contrast_first:
            out = self.contrast(out)
        out = self.hue(self.saturation(out))
        if not contrast_first:
            out = self.contrast(out)
        return out.clamp(0.0, 1.0).to(images.dtype)


class StrongPhotometric(nn.Module):
    """The strong view of semi-supervised segmentation: colour changes and blur, nothing
    geometric, so that the view stays pixel-aligned with the weak view it is made from and
    the weak view's pseudo-labels are its targets at the same places. The strong views of
    FixMatch-style segmentation methods (e.g. UniMatch, Yang et al. 2023, CVPR) use these
    three:

    * colour jitter (brightness, contrast and saturation factors in ``[1 - j, 1 + j]``,
      hue shift of up to ``hue`` turns) with probability ``jitter_p``;
    * grey scale with probability ``grayscale_p``;
    * Gaussian blur (sigma drawn from ``blur_sigma``, a kernel of ``2 ceil(3 sigma_max) + 1``
      pixels) with probability ``blur_p``.

    Each is drawn per image from torch's global generator. Cut-out boxes, the fourth change
    of those methods, are :func:`cutout_boxes` (applied after normalisation).

    ``forward(images)``: float ``(B, 3, H, W)`` in ``[0, 1]`` -> the same shape and dtype.
    """

    def __init__(
        self,
        jitter: float = 0.5,
        hue: float = 0.25,
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        blur_p: float = 0.5,
    ) -> None:
        super().__init__()
        import kornia.augmentation as K

        check_probability(jitter, "jitter")
        if not 0.0 <= check_non_negative(hue, "hue") <= 0.5:
            raise ValueError(f"hue must lie in [0, 0.5] turns, got {hue}")
        check_probability(jitter_p, "jitter_p")
        check_probability(grayscale_p, "grayscale_p")
        check_probability(blur_p, "blur_p")
        if not isinstance(blur_sigma, tuple | list) or len(blur_sigma) != 2:
            raise TypeError(f"blur_sigma must be a pair (low, high), got {blur_sigma!r}")
        low, high = float(blur_sigma[0]), float(blur_sigma[1])
        if not 0.0 < low <= high:
            raise ValueError(f"blur_sigma must satisfy 0 < low <= high, got {(low, high)}")
        kernel = 2 * int(np.ceil(3 * high)) + 1
        self.jitter = K.ColorJitter(jitter, jitter, jitter, hue, p=jitter_p)
        self.grayscale = K.RandomGrayscale(p=grayscale_p)
        self.blur = K.RandomGaussianBlur((kernel, kernel), (low, high), p=blur_p)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_rgb_batch(images)
        out = self.blur(self.grayscale(self.jitter(images)))
        return out.clamp(0.0, 1.0).to(images.dtype)


def cutout_boxes(
    images: torch.Tensor,
    *,
    p: float = 0.5,
    area: tuple[float, float] = (0.02, 0.4),
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    value: float = 0.0,
) -> torch.Tensor:
    """Fill one random box of each image, with probability ``p``, with ``value`` (0 after
    normalisation is the mean colour). The box covers a fraction of the image drawn from
    ``area`` with a height / width ratio drawn log-uniformly from ``aspect``, clipped to the
    image. Draws come from torch's global generator. Returns a new tensor; the labels of
    the pixels are unchanged (a model must predict a covered pixel from its context).
    """
    check_probability(p, "p")
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if not 0.0 < area[0] <= area[1] <= 1.0:
        raise ValueError(f"area must satisfy 0 < low <= high <= 1, got {tuple(area)}")
    if not 0.0 < aspect[0] <= aspect[1]:
        raise ValueError(f"aspect must satisfy 0 < low <= high, got {tuple(aspect)}")
    batch, _, height, width = images.shape
    apply = torch.rand(batch) < p
    fraction = torch.empty(batch).uniform_(area[0], area[1])
    log_ratio = torch.empty(batch).uniform_(float(np.log(aspect[0])), float(np.log(aspect[1])))
    ratio = log_ratio.exp()
    box_h = (fraction * height * width * ratio).sqrt().round().clamp(1, height).long()
    box_w = (fraction * height * width / ratio).sqrt().round().clamp(1, width).long()
    top = (torch.rand(batch) * (height - box_h + 1)).long()
    left = (torch.rand(batch) * (width - box_w + 1)).long()
    rows = torch.arange(height)[None, :, None]
    cols = torch.arange(width)[None, None, :]
    boxes = (
        apply[:, None, None]
        & (rows >= top[:, None, None])
        & (rows < (top + box_h)[:, None, None])
        & (cols >= left[:, None, None])
        & (cols < (left + box_w)[:, None, None])
    ).to(images.device)
    return torch.where(boxes[:, None], torch.full_like(images, value), images)
