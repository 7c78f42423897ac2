"""Semantic segmentation inference: whole image, sliding window, multi-scale and flip.

:func:`segment` turns a segmentation model, whose logits may come at a stride of its input
(``H/4`` for :class:`~anchorlearn.models.segmentation.SmallUNet`), into logits at the input
size, the way semantic segmentation results are reported:

- ``mode="whole"``: one forward pass per image, the logits resized bilinearly to ``(H, W)``.
- ``mode="slide"``: crops of ``crop_size`` every ``stride`` pixels; each crop's logits are
  resized to the crop, summed into place and divided by the number of crops that cover
  each pixel. The grid is mmsegmentation's: ``h_grids = max(H - h_crop + h_stride - 1, 0)
  // h_stride + 1`` rows starting at ``i * h_stride``, the last one moved back to end at
  the border (likewise for the columns).
- ``scales`` and ``flip``: the test-time augmentation; the logits of every (scale, flip)
  pass are resized to ``(H, W)`` and averaged.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from anchorlearn._checks import check_positive_int

__all__ = ["MODES", "scaled_size", "segment", "slide_windows"]

MODES = ("whole", "slide")

SegmentationModel = Callable[[torch.Tensor], object]


def _pair(value: object, name: str) -> tuple[int, int]:
    """An int ``n`` as ``(n, n)`` or a pair of ints, each >= 1."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise TypeError(f"{name} must be an int or a pair of ints (h, w), got {value!r}")
    h, w = value
    if any(isinstance(v, bool) or not isinstance(v, int) for v in (h, w)):
        raise TypeError(f"{name} must be an int or a pair of ints (h, w), got {value!r}")
    if h < 1 or w < 1:
        raise ValueError(f"{name} must be positive, got {tuple(value)}")
    return h, w


def _check_scales(scales: object) -> tuple[float, ...]:
    if isinstance(scales, (int, float)) or not isinstance(scales, Sequence):
        raise TypeError(f"scales must be a sequence of floats, got {scales!r}")
    if len(scales) == 0:
        raise ValueError("scales must hold at least one scale, got an empty sequence")
    checked = []
    for scale in scales:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scales must hold numbers, got {scale!r} in {tuple(scales)}")
        if not 0.0 < scale < float("inf"):
            raise ValueError(f"scales must be finite and > 0, got {scale} in {tuple(scales)}")
        checked.append(float(scale))
    return tuple(checked)


def _check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def slide_windows(
    size: tuple[int, int], crop_size: tuple[int, int], stride: tuple[int, int]
) -> list[tuple[int, int, int, int]]:
    """The crops ``(y1, y2, x1, x2)`` of the sliding window over an image of ``size``
    ``(H, W)`` no smaller than ``crop_size``, row by row."""
    (height, width), (h_crop, w_crop), (h_stride, w_stride) = size, crop_size, stride
    h_grids = max(height - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(width - w_crop + w_stride - 1, 0) // w_stride + 1
    windows = []
    for row in range(h_grids):
        y2 = min(row * h_stride + h_crop, height)
        y1 = max(y2 - h_crop, 0)
        for col in range(w_grids):
            x2 = min(col * w_stride + w_crop, width)
            x1 = max(x2 - w_crop, 0)
            windows.append((y1, y2, x1, x2))
    return windows


class _Runner:
    """Forward passes of ``model`` with the output checks and the bilinear resizing."""

    def __init__(self, model: SegmentationModel, align_corners: bool) -> None:
        self.model = model
        self.align_corners = align_corners
        self.num_classes: int | None = None

    def logits(self, images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """float32 logits ``(b, K, *size)`` of ``images`` ``(b, C, h, w)``."""
        output = self.model(images)
        logits = output[0] if isinstance(output, (tuple, list)) and output else output
        if not isinstance(logits, torch.Tensor):
            raise TypeError(
                "model must return logits or (logits, features) with a tensor first, "
                f"got {type(logits).__name__}"
            )
        if logits.ndim != 4 or logits.shape[0] != images.shape[0]:
            raise ValueError(
                f"model output must be 4-D logits ({images.shape[0]}, K, h, w) for input "
                f"{tuple(images.shape)}, got shape {tuple(logits.shape)}"
            )
        if not logits.is_floating_point():
            raise TypeError(f"model output must be floating-point logits, got {logits.dtype}")
        if self.num_classes is None:
            self.num_classes = logits.shape[1]
        elif logits.shape[1] != self.num_classes:
            raise ValueError(
                f"model output must keep {self.num_classes} channels across passes, "
                f"got shape {tuple(logits.shape)}"
            )
        logits = logits.float()
        if tuple(logits.shape[-2:]) != size:
            logits = F.interpolate(
                logits, size=size, mode="bilinear", align_corners=self.align_corners
            )
        return logits

    def resize(self, tensor: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(tensor.shape[-2:]) == size:
            return tensor
        return F.interpolate(tensor, size=size, mode="bilinear", align_corners=self.align_corners)


def _whole(
    runner: _Runner, images: torch.Tensor, out_size: tuple[int, int], batch_size: int
) -> torch.Tensor:
    chunks = [
        runner.logits(images[i : i + batch_size], out_size)
        for i in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(chunks)


def _slide(
    runner: _Runner,
    images: torch.Tensor,
    out_size: tuple[int, int],
    crop_size: tuple[int, int],
    stride: tuple[int, int],
    batch_size: int,
) -> torch.Tensor:
    b, _, height, width = images.shape
    pad_h, pad_w = max(crop_size[0] - height, 0), max(crop_size[1] - width, 0)
    if pad_h or pad_w:  # bottom / right zero padding, cut off below
        images = F.pad(images, (0, pad_w, 0, pad_h))
    padded = (height + pad_h, width + pad_w)
    windows = slide_windows(padded, crop_size, stride)
    total: torch.Tensor | None = None
    count = torch.zeros(padded, device=images.device)
    for y1, y2, x1, x2 in windows:
        count[y1:y2, x1:x2] += 1
    # crop k is window k // b of image k % b
    for start in range(0, len(windows) * b, batch_size):
        ks = range(start, min(start + batch_size, len(windows) * b))
        boxes = [(k % b, *windows[k // b]) for k in ks]
        crops = torch.stack([images[i, :, y1:y2, x1:x2] for i, y1, y2, x1, x2 in boxes])
        logits = runner.logits(crops, crop_size)
        if total is None:
            total = logits.new_zeros((b, logits.shape[1], *padded))
        for crop_logits, (i, y1, y2, x1, x2) in zip(logits, boxes, strict=True):
            total[i, :, y1:y2, x1:x2] += crop_logits
    assert total is not None  # there is at least one window
    result = (total / count)[:, :, :height, :width]
    return runner.resize(result, out_size)


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """The size :func:`segment` resizes a ``height x width`` image to for ``scale``:
    ``round(scale * side)`` with halves rounded up, at least 1."""
    return max(int(height * scale + 0.5), 1), max(int(width * scale + 0.5), 1)


@torch.no_grad()
def segment(
    model: SegmentationModel,
    images: torch.Tensor,
    *,
    mode: str = "whole",
    crop_size: int | tuple[int, int] | None = None,
    stride: int | tuple[int, int] | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    batch_size: int | None = None,
    align_corners: bool = False,
) -> torch.Tensor:
    """Logits ``(B, K, H, W)`` at the input size of ``images`` ``(B, C, H, W)``.

    Args:
        model: a callable on float images ``(b, C, h, w)`` that returns logits
            ``(b, K, h', w')``, or a tuple ``(logits, features)`` as anchorlearn's
            segmentation models do; ``h', w'`` may be a stride of ``h, w`` (``h/4``).
        images: normalised float images ``(B, C, H, W)``; the model receives them in their
            own dtype and on their own device.
        mode: ``"whole"`` (one pass per image) or ``"slide"`` (sliding window).
        crop_size: ``(h_crop, w_crop)`` (or one int for both) of the sliding window;
            required by and only allowed with ``mode="slide"``.
        stride: ``(h_stride, w_stride)`` of the sliding window, at most the crop so that the
            crops leave no gap; the crop size (no overlap) when ``None``.
        scales: image scales of the test-time augmentation; each pass sees the images
            resized bilinearly to ``(round(s * H), round(s * W))`` (halves rounded up), the
            crop size staying in pixels.
        flip: also run every scale on the horizontally flipped images and flip the logits
            back.
        batch_size: images (``"whole"``) or crops (``"slide"``) per forward pass, to bound
            memory; by default ``B``: all images at once, or one crop position of every
            image per pass.
        align_corners: passed to every bilinear resize.

    Returns:
        float32 logits ``(B, K, H, W)`` on the device of ``images``.

    An image smaller than the crop (in either dimension) is padded with zeros (after
    normalisation, i.e. the mean colour) at the bottom and right to the crop size, so that
    every forward pass sees exactly ``crop_size``; the padding is cut off the logits before
    they are resized back to ``(H, W)``.

    The (scale, flip) passes are merged by averaging their logits, not their softmax
    probabilities (mmsegmentation's test-time augmentation averages probabilities): the
    result then stays logits in every mode, to be fed unchanged to an argmax, a softmax, a
    loss or :class:`~anchorlearn.metrics.SegmentationIoU`, and the average of logits is the
    same rule the sliding window applies to overlapping crops (a normalised geometric mean
    of the passes' probabilities). The two can differ in the argmax only where the passes
    disagree.

    The model runs under ``torch.no_grad()`` and its train/eval mode is left as it is: call
    ``model.eval()`` first (batch norm and dropout in training mode give other results); a
    module still in training mode draws a ``UserWarning``.
    """
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"images must be a floating-point tensor, got dtype {images.dtype}")
    if images.ndim != 4 or 0 in images.shape:
        raise ValueError(
            f"images must be a non-empty 4-D tensor (B, C, H, W), got shape {tuple(images.shape)}"
        )
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "slide":
        if crop_size is None:
            raise ValueError("crop_size must be given for mode='slide', got None")
        crop = _pair(crop_size, "crop_size")
        step = crop if stride is None else _pair(stride, "stride")
        if step[0] > crop[0] or step[1] > crop[1]:
            raise ValueError(
                f"stride must not exceed crop_size {crop} (the crops would leave gaps), got {step}"
            )
    elif crop_size is not None or stride is not None:
        raise ValueError(
            f"crop_size and stride apply to mode='slide' only, got crop_size={crop_size!r} "
            f"and stride={stride!r} with mode={mode!r}"
        )
    scale_list = _check_scales(scales)
    _check_bool(flip, "flip")
    _check_bool(align_corners, "align_corners")
    per_pass = (
        images.shape[0] if batch_size is None else check_positive_int(batch_size, "batch_size")
    )
    if isinstance(model, nn.Module) and model.training:
        warnings.warn(
            "segment: model is in training mode (batch norm and dropout act as in training); "
            "call model.eval() first",
            UserWarning,
            stacklevel=3,
        )

    runner = _Runner(model, align_corners)
    height, width = images.shape[-2:]
    out_size = (height, width)
    total: torch.Tensor | None = None
    passes = 0
    for scale in scale_list:
        if scale == 1.0:
            scaled = images
        else:
            scaled = runner.resize(images, scaled_size(height, width, scale))
        for flipped in (False, True) if flip else (False,):
            inputs = scaled.flip(-1) if flipped else scaled
            if mode == "whole":
                logits = _whole(runner, inputs, out_size, per_pass)
            else:
                logits = _slide(runner, inputs, out_size, crop, step, per_pass)
            if flipped:
                logits = logits.flip(-1)
            total = logits if total is None else total + logits
            passes += 1
    assert total is not None
    return (total / passes) if passes > 1 else total
