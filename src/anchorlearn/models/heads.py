"""Segmentation decode heads that map an encoder's feature maps to ``(logits, features)``.

A head takes the list of maps an encoder returns, one ``(B, c_i, h_i, w_i)`` map per stage
at stride ``s_i`` (non-decreasing), and returns ``(logits (B, C, h, w), features (B, D, h,
w))`` at its ``output_stride``. The features are the last feature map of the head;
``Dropout2d`` (training only) and the final 1x1 convolution ``classifier`` follow, so
``logits == classifier(features)`` in eval mode. The features are what SAR and the other
feature regularizers read; the classifier is what SAR classifies its anchors with.

- :class:`FCNHead`: every map resized to the first (finest) map and concatenated, then
  conv-BN-ReLU layers (the head of HRNet's segmentation models and of the SAR release).
- :class:`DeepLabV3PlusHead`: atrous spatial pyramid pooling on the last map and a decoder
  that fuses it with stride-4 low-level features (Chen et al., ECCV 2018).
- :class:`MLPHead`: SegFormer's all-MLP decoder (Xie et al., NeurIPS 2021).

Weights: convolutions have Kaiming-normal weights (``fan_out``, ReLU gain) and zero
biases, BatchNorm has unit weight and zero bias, and the classifier has normal weights of
standard deviation 0.01 and zero bias (as mmsegmentation's decode heads).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from anchorlearn._checks import check_num_classes, check_positive_int, check_probability

__all__ = ["DecodeHead", "DeepLabV3PlusHead", "FCNHead", "MLPHead"]

#: ASPP rates of DeepLab at an output stride of 16; other strides scale them by ``16 / s``.
ASPP_RATES_AT_STRIDE_16 = (6, 12, 18)


def _int_tuple(values: object, name: str) -> tuple[int, ...]:
    """A non-empty sequence of ints ``>= 1`` as a tuple."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence of ints, got {type(values).__name__}")
    if len(values) == 0:
        raise ValueError(f"{name} must not be empty, got {values!r}")
    return tuple(check_positive_int(v, f"{name}[{i}]") for i, v in enumerate(values))


def _conv_bn_relu(
    in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1
) -> nn.Sequential:
    """Conv (no bias, 'same' padding) -> BatchNorm -> ReLU."""
    return nn.Sequential(
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            padding=dilation * (kernel_size // 2),
            dilation=dilation,
            bias=False,
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


def _separable_conv_bn_relu(
    in_channels: int, out_channels: int, dilation: int = 1
) -> nn.Sequential:
    """Depthwise 3x3 conv -> BN -> ReLU -> pointwise 1x1 conv -> BN -> ReLU (DeepLabv3+)."""
    return nn.Sequential(
        nn.Conv2d(
            in_channels,
            in_channels,
            3,
            padding=dilation,
            dilation=dilation,
            groups=in_channels,
            bias=False,
        ),
        nn.BatchNorm2d(in_channels),
        nn.ReLU(),
        *_conv_bn_relu(in_channels, out_channels, 1),
    )


def _conv3x3_bn_relu(
    in_channels: int, out_channels: int, dilation: int, separable: bool
) -> nn.Sequential:
    if separable:
        return _separable_conv_bn_relu(in_channels, out_channels, dilation)
    return _conv_bn_relu(in_channels, out_channels, 3, dilation)


def _resize(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """``x`` resized bilinearly (``align_corners=False``) to ``size``; unchanged if equal."""
    if x.shape[-2:] == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class DecodeHead(nn.Module):
    """Base of the decode heads: input checks, dropout, the classifier, weight init.

    Subclasses build their layers, set ``feat_dim`` and ``output_stride``, call
    :meth:`_init_head` and implement :meth:`_features`.

    Args:
        in_channels: channels ``c_i`` of the encoder's maps.
        strides: stride ``s_i`` of each map w.r.t. the input, non-decreasing.
        num_classes: number of classes ``C`` (``>= 2``).
        dropout: ``Dropout2d`` probability before the classifier (training only).

    Attributes:
        classifier: the final ``nn.Conv2d(feat_dim, num_classes, 1)``.
        feat_dim: channels ``D`` of the features.
        output_stride: stride of the outputs w.r.t. the input.
    """

    classifier: nn.Module
    feat_dim: int
    output_stride: int
    #: indices of the maps normalised by BatchNorm at their own resolution (checked for a
    #: training batch that holds a single value per channel)
    _normalised_maps: tuple[int, ...] = ()

    def __init__(
        self,
        in_channels: Sequence[int],
        strides: Sequence[int],
        num_classes: int,
        *,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.in_channels = _int_tuple(in_channels, "in_channels")
        self.strides = _int_tuple(strides, "strides")
        if len(self.strides) != len(self.in_channels):
            raise ValueError(
                f"strides must have one entry per map ({len(self.in_channels)} in_channels), "
                f"got {len(self.strides)}"
            )
        if any(a > b for a, b in zip(self.strides, self.strides[1:], strict=False)):
            raise ValueError(f"strides must be non-decreasing, got {self.strides}")
        self.num_classes = check_num_classes(num_classes)
        self.dropout = nn.Dropout2d(check_probability(dropout, "dropout"))

    def _init_head(self, feat_dim: int, output_stride: int) -> None:
        """Create the classifier and initialise every weight of the head."""
        self.feat_dim = feat_dim
        self.output_stride = output_stride
        self.classifier = nn.Conv2d(feat_dim, self.num_classes, 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def _check_maps(self, maps: object) -> list[torch.Tensor]:
        if not isinstance(maps, (list, tuple)):
            raise TypeError(f"maps must be a list of tensors, got {type(maps).__name__}")
        if len(maps) != len(self.in_channels):
            raise ValueError(
                f"maps must hold {len(self.in_channels)} tensors (one per encoder map), "
                f"got {len(maps)}"
            )
        for i, (fmap, channels) in enumerate(zip(maps, self.in_channels, strict=True)):
            if not isinstance(fmap, torch.Tensor) or not fmap.is_floating_point():
                got = fmap.dtype if isinstance(fmap, torch.Tensor) else type(fmap).__name__
                raise TypeError(f"maps[{i}] must be a floating-point tensor, got {got}")
            if fmap.ndim != 4 or fmap.shape[1] != channels:
                raise ValueError(
                    f"maps[{i}] must have shape (B, {channels}, h, w), got {tuple(fmap.shape)}"
                )
            if fmap.shape[0] != maps[0].shape[0]:
                raise ValueError(
                    f"maps[{i}] must have the batch size of maps[0] ({maps[0].shape[0]}), "
                    f"got {fmap.shape[0]}"
                )
        if self.training:
            for i in self._normalised_maps:
                b, _, h, w = maps[i].shape
                if b * h * w == 1:
                    raise ValueError(
                        f"maps[{i}] must hold more than one value per channel in training "
                        f"(BatchNorm), got shape {tuple(maps[i].shape)}: use a larger input, "
                        "a larger batch or eval mode"
                    )
        return list(maps)

    def _features(self, maps: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def forward_features(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """Features ``(B, D, h, w)`` at ``output_stride`` of the encoder's ``maps``."""
        return self._features(self._check_maps(maps))

    def forward(self, maps: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits (B, C, h, w), features (B, D, h, w))``; the logits are
        ``classifier(dropout(features))``."""
        features = self.forward_features(maps)
        return self.classifier(self.dropout(features)), features


class FCNHead(DecodeHead):
    """FCN head over all maps resized to the finest one and concatenated.

    Every map is resized bilinearly to the size of the first (finest) map and the maps are
    concatenated into ``D_in = sum(in_channels)`` channels (720 for HRNet-W48, 270 for
    HRNet-W18); ``num_convs`` conv-BN-ReLU layers of ``kernel_size`` and ``channels``
    outputs follow and give the features. This is mmsegmentation's ``FCNHead`` with the
    ``resize_concat`` input transform and no input concatenation, the head of the HRNet
    segmentation models and of the SAR release.

    Args:
        in_channels, strides, num_classes, dropout: see :class:`DecodeHead`.
        channels: channels of the conv layers, hence ``feat_dim`` (default ``D_in``).
        num_convs: number of conv-BN-ReLU layers (``0``: the features are the concatenated
            maps, and ``channels`` must be ``None`` or ``D_in``).
        kernel_size: odd kernel size of the conv layers.

    Shapes: ``maps[i]`` ``(B, c_i, h_i, w_i)``; outputs at the first map's size
    ``(h_0, w_0)``, ``output_stride = strides[0]``.
    """

    _normalised_maps = (0,)

    def __init__(
        self,
        in_channels: Sequence[int],
        strides: Sequence[int],
        num_classes: int,
        *,
        channels: int | None = None,
        num_convs: int = 1,
        kernel_size: int = 1,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(in_channels, strides, num_classes, dropout=dropout)
        concat_channels = sum(self.in_channels)
        if isinstance(num_convs, bool) or not isinstance(num_convs, int):
            raise TypeError(f"num_convs must be an int, got {type(num_convs).__name__}")
        if num_convs < 0:
            raise ValueError(f"num_convs must be >= 0, got {num_convs}")
        if check_positive_int(kernel_size, "kernel_size") % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if channels is None:
            channels = concat_channels
        check_positive_int(channels, "channels")
        if num_convs == 0 and channels != concat_channels:
            raise ValueError(
                f"channels must be None or sum(in_channels)={concat_channels} when "
                f"num_convs=0, got {channels}"
            )
        layers = [
            _conv_bn_relu(concat_channels if i == 0 else channels, channels, kernel_size)
            for i in range(num_convs)
        ]
        self.convs = nn.Sequential(*layers)
        if num_convs == 0:
            self._normalised_maps = ()
        self._init_head(channels, self.strides[0])

    def _features(self, maps: list[torch.Tensor]) -> torch.Tensor:
        size = maps[0].shape[-2:]
        return self.convs(torch.cat([_resize(fmap, size) for fmap in maps], dim=1))


class _ImagePooling(nn.Module):
    """ASPP's image-level branch: global average pool, 1x1 conv with bias, ReLU, broadcast.

    It has no BatchNorm: a pooled ``(B, C, 1, 1)`` map has one value per channel and image,
    so BatchNorm in training fails for a batch of one (and is noisy for small batches); the
    biased convolution keeps the branch trainable at any batch size.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.relu(self.conv(x.mean(dim=(2, 3), keepdim=True)))
        return pooled.expand(-1, -1, x.shape[2], x.shape[3])


class _ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, one 3x3 branch per dilation and the
    image pooling branch, concatenated and projected by a 1x1 conv-BN-ReLU."""

    def __init__(
        self, in_channels: int, channels: int, dilations: tuple[int, ...], separable: bool
    ) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn_relu(in_channels, channels, 1)]
            + [_conv3x3_bn_relu(in_channels, channels, d, separable) for d in dilations]
        )
        self.image_pool = _ImagePooling(in_channels, channels)
        self.project = _conv_bn_relu((len(dilations) + 2) * channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        outs.append(self.image_pool(x))
        return self.project(torch.cat(outs, dim=1))


class DeepLabV3PlusHead(DecodeHead):
    """DeepLabv3+ decoder: ASPP on the last map, fused with stride-4 low-level features.

    ASPP (a 1x1 branch, one 3x3 atrous branch per dilation, an image-pooling branch) runs on
    the last (coarsest) map and is projected to ``channels``; the low-level map is projected
    by a 1x1 conv-BN-ReLU to ``low_level_channels`` (48); the ASPP output is upsampled
    bilinearly to the low-level map's size, concatenated with it, and two 3x3 conv-BN-ReLU
    layers of ``channels`` give the features (Chen et al., "Encoder-Decoder with Atrous
    Separable Convolution for Semantic Image Segmentation", ECCV 2018).

    The low-level map is the first map of stride 4 or, if there is none, the first map. The
    default dilations are DeepLab's (6, 12, 18) at an output stride of 16, scaled by
    ``16 / s`` for a last map of stride ``s`` so that they cover the same image extent:
    (12, 24, 36) at stride 8 (as in the paper) and (3, 6, 9) at stride 32 (a choice of this
    library; the paper has no stride-32 setting). The image-pooling branch has no BatchNorm
    (it would fail on a training batch of one), only a biased 1x1 conv and ReLU.

    Args:
        in_channels, strides, num_classes, dropout: see :class:`DecodeHead`.
        channels: channels of ASPP and of the decoder convs, hence ``feat_dim`` (256).
        dilations: ASPP rates of the 3x3 branches (default: see above).
        separable: depthwise-separable 3x3 convs (depthwise 3x3-BN-ReLU, pointwise
            1x1-BN-ReLU) in ASPP and in the decoder, as in the paper's Xception model: far
            fewer parameters and multiply-adds.
        low_level_channels: channels of the projected low-level features (48).

    Shapes: outputs at the low-level map's size; ``output_stride`` is its stride.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        strides: Sequence[int],
        num_classes: int,
        *,
        channels: int = 256,
        dilations: Sequence[int] | None = None,
        separable: bool = False,
        low_level_channels: int = 48,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(in_channels, strides, num_classes, dropout=dropout)
        check_positive_int(channels, "channels")
        check_positive_int(low_level_channels, "low_level_channels")
        if not isinstance(separable, bool):
            raise TypeError(f"separable must be a bool, got {type(separable).__name__}")
        if dilations is None:
            last = self.strides[-1]
            dilations = tuple(max(1, round(r * 16 / last)) for r in ASPP_RATES_AT_STRIDE_16)
        self.dilations = _int_tuple(dilations, "dilations")
        self.separable = separable
        self.low_level_index = self.strides.index(4) if 4 in self.strides else 0
        self._normalised_maps = (self.low_level_index, len(self.strides) - 1)
        self.aspp = _ASPP(self.in_channels[-1], channels, self.dilations, separable)
        self.low_level = _conv_bn_relu(
            self.in_channels[self.low_level_index], low_level_channels, 1
        )
        self.decoder = nn.Sequential(
            _conv3x3_bn_relu(channels + low_level_channels, channels, 1, separable),
            _conv3x3_bn_relu(channels, channels, 1, separable),
        )
        self._init_head(channels, self.strides[self.low_level_index])

    def _features(self, maps: list[torch.Tensor]) -> torch.Tensor:
        low = self.low_level(maps[self.low_level_index])
        context = _resize(self.aspp(maps[-1]), low.shape[-2:])
        return self.decoder(torch.cat([context, low], dim=1))


class MLPHead(DecodeHead):
    """SegFormer's all-MLP decoder.

    Each map goes through its own 1x1 convolution with bias (a per-pixel linear layer) to
    ``channels``, is upsampled bilinearly to the first map's size; the maps are concatenated
    and fused by a 1x1 conv-BN-ReLU to ``channels``, the features (Xie et al., "SegFormer:
    Simple and Efficient Design for Semantic Segmentation with Transformers", NeurIPS 2021).

    Args:
        in_channels, strides, num_classes, dropout: see :class:`DecodeHead`.
        channels: embedding channels of every map and of the features (256).

    Shapes: outputs at the first map's size, ``output_stride = strides[0]``.
    """

    _normalised_maps = (0,)

    def __init__(
        self,
        in_channels: Sequence[int],
        strides: Sequence[int],
        num_classes: int,
        *,
        channels: int = 256,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(in_channels, strides, num_classes, dropout=dropout)
        check_positive_int(channels, "channels")
        self.embed = nn.ModuleList([nn.Conv2d(c, channels, 1) for c in self.in_channels])
        self.fuse = _conv_bn_relu(len(self.in_channels) * channels, channels, 1)
        self._init_head(channels, self.strides[0])

    def _features(self, maps: list[torch.Tensor]) -> torch.Tensor:
        size = maps[0].shape[-2:]
        embedded = [
            _resize(embed(fmap), size) for embed, fmap in zip(self.embed, maps, strict=True)
        ]
        return self.fuse(torch.cat(embedded, dim=1))
