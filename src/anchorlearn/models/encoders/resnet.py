"""Dilated ResNet-50/101 (He et al., "Deep Residual Learning for Image Recognition", CVPR
2016) as segmentation encoders, as in dilated FCN / DeepLab backbones.

The network is torchvision's ResNet v1.5: a 7x7 stride-2 stem (``conv1``, ``bn1``), a 3x3
stride-2 max pool and four layers of bottleneck blocks (1x1 reduce, 3x3, 1x1 expand by 4,
each followed by batch norm) with 3, 4, 6, 3 (ResNet-50) or 3, 4, 23, 3 (ResNet-101) blocks
of widths 64, 128, 256, 512; the stride of a layer sits on the 3x3 convolution of its first
block, whose shortcut is a strided 1x1 convolution with batch norm (``downsample.0/.1``).

For dense prediction the last layers trade stride for dilation: at output stride 8
``layer3`` and ``layer4`` keep the resolution and use dilation 2 and 4, at 16 only
``layer4`` (dilation 2). As torchvision's ``replace_stride_with_dilation``, the first
block of a dilated layer uses the previous layer's dilation. Key names and shapes equal
torchvision's and timm's ``resnet50`` / ``resnet101`` (``conv1``, ``bn1``,
``layer1.0.conv1``, ``layer1.0.downsample.0``, ...), so their ImageNet state dicts load
directly (``fc.*`` is ignored). Every stride-2 layer maps a size ``s`` to ``ceil(s / 2)``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from anchorlearn._checks import check_positive_int
from anchorlearn.models.encoders import IMAGENET_MEAN, IMAGENET_STD, Encoder, channel_statistics
from anchorlearn.models.pretrained import load_pretrained

__all__ = ["Bottleneck", "ResNetEncoder", "resnet50", "resnet101"]

_WIDTHS = (64, 128, 256, 512)
_OUTPUT_STRIDES = (8, 16, 32)


class Bottleneck(nn.Module):
    """``conv1`` 1x1 -> ``conv2`` 3x3 (stride, dilation) -> ``conv3`` 1x1 (``4 * planes``),
    each with batch norm, ReLU after the first two and after adding the shortcut."""

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(
            planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class ResNetEncoder(Encoder):
    """Bottleneck ResNet returning the outputs of ``layer1`` .. ``layer4``.

    Args:
        layers: blocks per layer, ``(3, 4, 6, 3)`` for ResNet-50, ``(3, 4, 23, 3)`` for
            ResNet-101.
        in_channels: image channels.
        output_stride: 8 (default), 16 or 32; see the module docstring.

    ``forward(x)`` with ``x`` ``(B, in_channels, H, W)`` returns maps of 256, 512, 1024 and
    2048 channels at strides ``(4, 8, 8, 8)`` (output stride 8), ``(4, 8, 16, 16)`` (16) or
    ``(4, 8, 16, 32)`` (32), each ``(B, c, ceil(H / s), ceil(W / s))``. Normalise inputs
    with :attr:`input_mean` / :attr:`input_std` (ImageNet statistics for RGB in ``[0, 1]``).
    """

    out_channels = tuple(w * Bottleneck.expansion for w in _WIDTHS)

    def __init__(
        self, layers: tuple[int, int, int, int], in_channels: int = 3, output_stride: int = 8
    ) -> None:
        super().__init__()
        if not isinstance(layers, (tuple, list)) or len(layers) != 4:
            raise ValueError(f"layers must be 4 block counts, got {layers!r}")
        for count in layers:
            check_positive_int(count, "layers[i]")
        self.in_channels = check_positive_int(in_channels, "in_channels")
        if isinstance(output_stride, bool) or output_stride not in _OUTPUT_STRIDES:
            raise ValueError(
                f"output_stride must be one of {_OUTPUT_STRIDES}, got {output_stride!r}"
            )
        self.output_stride = output_stride
        self.input_mean = channel_statistics(IMAGENET_MEAN, in_channels)
        self.input_std = channel_statistics(IMAGENET_STD, in_channels)

        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self._channels, self._stride, self._dilation = 64, 4, 1
        strides = []
        for index, (width, count) in enumerate(zip(_WIDTHS, layers, strict=True)):
            layer = self._make_layer(width, count, stride=1 if index == 0 else 2)
            self.add_module(f"layer{index + 1}", layer)
            strides.append(self._stride)
        self.strides = tuple(strides)
        del self._channels, self._stride, self._dilation
        self._init_weights()

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        previous_dilation = self._dilation
        if stride > 1 and self._stride * stride > self.output_stride:
            self._dilation *= stride
            stride = 1
        self._stride *= stride
        out_channels = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or self._channels != out_channels:
            downsample = nn.Sequential(
                nn.Conv2d(self._channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        modules = [Bottleneck(self._channels, planes, stride, previous_dilation, downsample)]
        modules += [
            Bottleneck(out_channels, planes, dilation=self._dilation) for _ in range(blocks - 1)
        ]
        self._channels = out_channels
        return nn.Sequential(*modules)

    def _init_weights(self) -> None:
        """torchvision's: Kaiming-normal (fan out) convolutions, batch norm ``(1, 0)``."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Four maps ``(B, c_i, ceil(H / s_i), ceil(W / s_i))`` of ``x`` ``(B, C, H, W)``."""
        x = F.relu(self.bn1(self.conv1(self.check_input(x))))
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        features = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            features.append(x)
        return features


def _build(
    name: str,
    layers: tuple[int, int, int, int],
    in_channels: int,
    pretrained: str | os.PathLike[str] | None,
    output_stride: int,
) -> ResNetEncoder:
    encoder = ResNetEncoder(layers, in_channels, output_stride)
    load_pretrained(encoder, pretrained, name=name, ignore=("fc",), input_conv="conv1.weight")
    return encoder


def resnet50(
    *,
    in_channels: int = 3,
    pretrained: str | os.PathLike[str] | None = None,
    output_stride: int = 8,
) -> ResNetEncoder:
    """Dilated ResNet-50 (23.5 M parameters).

    ``pretrained``: ``None`` or the path of a torchvision / timm ``resnet50`` state dict
    (``fc`` ignored; with ``in_channels != 3`` the RGB ``conv1`` filters are averaged).
    ``"imagenet"`` is refused: no ResNet weights are installable here without a download.
    """
    return _build("resnet50", (3, 4, 6, 3), in_channels, pretrained, output_stride)


def resnet101(
    *,
    in_channels: int = 3,
    pretrained: str | os.PathLike[str] | None = None,
    output_stride: int = 8,
) -> ResNetEncoder:
    """Dilated ResNet-101 (42.5 M parameters); ``pretrained`` as :func:`resnet50`."""
    return _build("resnet101", (3, 4, 23, 3), in_channels, pretrained, output_stride)
