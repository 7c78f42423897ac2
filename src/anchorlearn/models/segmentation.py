"""A light encoder-decoder for semantic segmentation with an FCN-style 1x1 classifier.

The encoder has four levels (strides 1, 2, 4, 8); the decoder upsamples the stride-8 map
bilinearly, concatenates the stride-4 skip and fuses them with two 3x3 conv-BN-ReLU layers.
That fused map is the feature map (stride 4, ``feat_dim`` channels), the counterpart of the
last decoder feature of an FCN head; dropout and a 1x1 convolution (``classifier``) follow.

Logits are returned at the feature resolution (stride 4), not at the input size: the
training engine upsamples them (or resizes the labels) itself, as mmsegmentation does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from anchorlearn._checks import (
    check_num_classes,
    check_positive_int,
    check_probability,
)
from anchorlearn.models.registry import register_model

__all__ = ["SmallUNet", "seg_net"]


def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class SmallUNet(nn.Module):
    """U-Net-like segmentation network whose output stride is 4.

    Args:
        num_classes: number of classes ``C``.
        in_channels: image channels.
        width: channels of the first encoder level; the levels have ``w, 2w, 3w, 4w``.
        feat_dim: channels ``D`` of the decoder output (the features).
        dropout: ``Dropout2d`` probability before the classifier (training only).

    With the defaults (``width=12``, ``feat_dim=32``) the network has about 100 k parameters.
    ``forward(x)`` with ``x`` ``(B, in_channels, H, W)``, ``H`` and ``W`` divisible by 8,
    returns ``(logits, features)`` of shapes ``(B, C, H/4, W/4)`` and ``(B, D, H/4, W/4)``;
    in eval mode ``logits == classifier(features)``.
    """

    output_stride = 4

    def __init__(
        self,
        num_classes: int = 21,
        in_channels: int = 3,
        width: int = 12,
        feat_dim: int = 32,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        check_positive_int(in_channels, "in_channels")
        check_positive_int(width, "width")
        self.feat_dim = check_positive_int(feat_dim, "feat_dim")
        check_probability(dropout, "dropout")
        self.enc1 = _double_conv(in_channels, width)
        self.enc2 = _double_conv(width, 2 * width)
        self.enc4 = _double_conv(2 * width, 3 * width)
        self.enc8 = _double_conv(3 * width, 4 * width)
        self.fuse = _double_conv(7 * width, feat_dim)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(feat_dim, num_classes, 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map ``(B, D, H/4, W/4)`` of images ``x`` ``(B, in_channels, H, W)``."""
        if x.ndim != 4 or x.shape[-2] % 8 or x.shape[-1] % 8:
            raise ValueError(
                f"x must have shape (B, C, H, W) with H and W divisible by 8, got {tuple(x.shape)}"
            )
        s1 = self.enc1(x)
        s2 = self.enc2(F.max_pool2d(s1, 2))
        s4 = self.enc4(F.max_pool2d(s2, 2))
        s8 = self.enc8(F.max_pool2d(s4, 2))
        up = F.interpolate(s8, size=s4.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([up, s4], dim=1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits (B, C, H/4, W/4), features (B, D, H/4, W/4))``."""
        features = self.forward_features(x)
        return self.classifier(self.dropout(features)), features


@register_model("seg_net")
def seg_net(**kwargs: object) -> SmallUNet:
    """The :class:`SmallUNet` with the given keyword arguments."""
    return SmallUNet(**kwargs)  # type: ignore[arg-type]
