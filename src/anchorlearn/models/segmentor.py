"""An encoder and a decode head as one segmentation network returning ``(logits, features)``.

:class:`EncoderDecoder` runs an encoder (:mod:`anchorlearn.models.encoders`: a module whose
``forward`` returns one map per stage and that exposes ``out_channels``, ``strides``,
``input_mean`` and ``input_std``) and a :class:`~anchorlearn.models.heads.DecodeHead`.
Like :class:`~anchorlearn.models.segmentation.SmallUNet`, it returns logits and features at
the head's output stride, not at the input size: the training engine upsamples the logits
(or resizes the labels) itself.

Registered builders (``create_model(name, num_classes=..., in_channels=..., ...)``):

- ``"fcn"``: :class:`~anchorlearn.models.heads.FCNHead` on HRNet-W48 (the SAR release's
  segmentation model), output stride 4.
- ``"deeplabv3plus"``: :class:`~anchorlearn.models.heads.DeepLabV3PlusHead` on ResNet-50 at
  encoder output stride 8, output stride 4.
- ``"mlp_head"``: :class:`~anchorlearn.models.heads.MLPHead` on EfficientNet-Lite0, output
  stride 4.

Each takes ``encoder`` (any name of :func:`~anchorlearn.models.encoders.list_encoders`),
``encoder_weights`` (``None``, ``"imagenet"`` or a path, the encoder's ``pretrained``) and
``encoder_kwargs`` (further keyword arguments of the encoder). :meth:`EncoderDecoder.param_groups`
splits the parameters into ``"backbone"`` and ``"head"`` for per-module learning rates.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from anchorlearn._checks import check_num_classes, check_positive_int
from anchorlearn.models.encoders import check_image_batch
from anchorlearn.models.heads import DecodeHead, DeepLabV3PlusHead, FCNHead, MLPHead
from anchorlearn.models.registry import register_model

__all__ = ["EncoderDecoder", "deeplabv3plus", "fcn", "mlp_head"]


def _encoder_tuple(encoder: nn.Module, name: str) -> tuple[int, ...]:
    value = getattr(encoder, name, None)
    if not isinstance(value, Sequence) or not all(isinstance(v, int) for v in value):
        raise TypeError(f"encoder.{name} must be a sequence of ints, got {value!r}")
    return tuple(value)


def _encoder_statistics(encoder: nn.Module, name: str) -> tuple[float, ...]:
    value = getattr(encoder, name, None)
    if (
        not isinstance(value, Sequence)
        or len(value) == 0
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        raise TypeError(f"encoder.{name} must be a non-empty sequence of floats, got {value!r}")
    return tuple(float(v) for v in value)


def _first_conv_in_channels(encoder: nn.Module) -> int | None:
    for module in encoder.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return None


class EncoderDecoder(nn.Module):
    """Segmentation network: ``head(encoder(x))`` with input checks and parameter groups.

    Args:
        encoder: module with ``forward(x) -> list of maps``, ``out_channels`` and
            ``strides`` (one entry per map), ``input_mean`` and ``input_std`` (the
            per-channel normalisation its pretrained weights expect, in [0, 1] units).
        head: a :class:`~anchorlearn.models.heads.DecodeHead` built for the encoder's
            ``out_channels`` and ``strides``.
        in_channels: image channels; by default the encoder's ``in_channels`` attribute or
            the input channels of its first ``nn.Conv2d``.

    Attributes:
        classifier: the head's final 1x1 ``nn.Conv2d(feat_dim, num_classes, 1)``; assigning
            ``model.classifier`` replaces the head's classifier.
        feat_dim, num_classes, output_stride: the head's.
        input_mean, input_std: the encoder's.
        min_input_size: the smallest accepted height and width, the encoder's largest
            stride (32 for EfficientNet and HRNet, 8 for the ResNets at output stride 8), so
            that every map has at least one pixel.

    ``forward(x)`` with ``x`` ``(B, in_channels, H, W)`` float, ``H, W >= min_input_size``,
    returns ``(logits (B, C, h, w), features (B, D, h, w))`` with ``h ~ H / output_stride``;
    in eval mode ``logits == classifier(features)``. A training batch of one image must
    also leave more than one pixel in the coarsest map (BatchNorm needs two values per
    channel): ``H`` or ``W`` larger than ``min_input_size``.
    """

    def __init__(
        self, encoder: nn.Module, head: DecodeHead, *, in_channels: int | None = None
    ) -> None:
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be an nn.Module, got {type(encoder).__name__}")
        if not isinstance(head, DecodeHead):
            raise TypeError(f"head must be a DecodeHead, got {type(head).__name__}")
        out_channels = _encoder_tuple(encoder, "out_channels")
        strides = _encoder_tuple(encoder, "strides")
        if out_channels != head.in_channels or strides != head.strides:
            raise ValueError(
                f"head must be built for the encoder's maps (out_channels={out_channels}, "
                f"strides={strides}), got in_channels={head.in_channels}, "
                f"strides={head.strides}"
            )
        if in_channels is None:
            in_channels = getattr(encoder, "in_channels", None) or _first_conv_in_channels(encoder)
            if in_channels is None:
                raise ValueError(
                    "in_channels must be given: the encoder has no in_channels attribute and "
                    "no nn.Conv2d, got None"
                )
        self.in_channels = check_positive_int(in_channels, "in_channels")
        encoder_in = getattr(encoder, "in_channels", None)
        if encoder_in is not None and encoder_in != in_channels:
            raise ValueError(
                f"in_channels must match the encoder's ({encoder_in}), got {in_channels}"
            )
        self.encoder = encoder
        self.head = head
        self.num_classes = head.num_classes
        self.feat_dim = head.feat_dim
        self.output_stride = head.output_stride
        self.min_input_size = max(strides)
        self.input_mean = _encoder_statistics(encoder, "input_mean")
        self.input_std = _encoder_statistics(encoder, "input_std")

    @property
    def classifier(self) -> nn.Module:
        """The head's final 1x1 convolution."""
        return self.head.classifier

    def __setattr__(self, name: str, value: object) -> None:
        # nn.Module.__setattr__ would register a second "classifier" beside the head's and
        # leave the head's in use; the classifier belongs to the head.
        if name == "classifier":
            self.head.classifier = value
            return
        super().__setattr__(name, value)

    def _check_input(self, x: object) -> torch.Tensor:
        x = check_image_batch(x, self.in_channels)
        b, _, h, w = x.shape
        if min(h, w) < self.min_input_size:
            raise ValueError(
                f"x must be at least {self.min_input_size}x{self.min_input_size} pixels "
                f"(the encoder's largest stride), got {tuple(x.shape)}"
            )
        if self.training and b == 1 and max(h, w) <= self.min_input_size:
            raise ValueError(
                f"x of a training batch of one image must be larger than "
                f"{self.min_input_size} pixels in H or W (BatchNorm needs more than one "
                f"value per channel in the coarsest map), got {tuple(x.shape)}"
            )
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``(B, D, h, w)`` of images ``x`` ``(B, in_channels, H, W)``."""
        return self.head.forward_features(self.encoder(self._check_input(x)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits (B, C, h, w), features (B, D, h, w))`` at ``output_stride``."""
        return self.head(self.encoder(self._check_input(x)))

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The parameters split for per-module learning rates: ``"backbone"`` (the
        encoder's) and ``"head"`` (every other one). Each parameter is in exactly one group,
        frozen ones included."""
        backbone = list(self.encoder.parameters())
        in_backbone = {id(p) for p in backbone}
        head = [p for p in self.parameters() if id(p) not in in_backbone]
        return {"backbone": backbone, "head": head}


def _build(
    make_head: Callable[[tuple[int, ...], tuple[int, ...]], DecodeHead],
    *,
    num_classes: int,
    in_channels: int,
    encoder: str,
    encoder_weights: str | os.PathLike[str] | None,
    encoder_kwargs: Mapping[str, object] | None,
) -> EncoderDecoder:
    check_num_classes(num_classes)
    check_positive_int(in_channels, "in_channels")
    if not isinstance(encoder, str):
        raise TypeError(f"encoder must be a str, got {type(encoder).__name__}")
    if encoder_weights is not None and not isinstance(encoder_weights, (str, os.PathLike)):
        raise TypeError(
            f"encoder_weights must be None, 'imagenet' or a path, got "
            f"{type(encoder_weights).__name__}"
        )
    if encoder_kwargs is None:
        encoder_kwargs = {}
    if not isinstance(encoder_kwargs, Mapping):
        raise TypeError(f"encoder_kwargs must be a dict, got {type(encoder_kwargs).__name__}")
    for key, instead in (("in_channels", "in_channels"), ("pretrained", "encoder_weights")):
        if key in encoder_kwargs:
            raise ValueError(
                f"encoder_kwargs must not hold {key!r} (pass {instead} instead), "
                f"got keys {sorted(encoder_kwargs)}"
            )
    from anchorlearn.models.encoders import create_encoder

    enc = create_encoder(
        encoder, in_channels=in_channels, pretrained=encoder_weights, **encoder_kwargs
    )
    head = make_head(tuple(enc.out_channels), tuple(enc.strides))
    return EncoderDecoder(enc, head, in_channels=in_channels)


@register_model("fcn")
def fcn(
    num_classes: int,
    in_channels: int = 3,
    encoder: str = "hrnet_w48",
    encoder_weights: str | os.PathLike[str] | None = None,
    encoder_kwargs: Mapping[str, object] | None = None,
    channels: int | None = None,
    num_convs: int = 1,
    kernel_size: int = 1,
    dropout: float = 0.1,
) -> EncoderDecoder:
    """:class:`~anchorlearn.models.heads.FCNHead` on ``encoder`` (HRNet-W48: ``feat_dim``
    720, about 65.9 M parameters)."""
    return _build(
        lambda ch, st: FCNHead(
            ch,
            st,
            num_classes,
            channels=channels,
            num_convs=num_convs,
            kernel_size=kernel_size,
            dropout=dropout,
        ),
        num_classes=num_classes,
        in_channels=in_channels,
        encoder=encoder,
        encoder_weights=encoder_weights,
        encoder_kwargs=encoder_kwargs,
    )


@register_model("deeplabv3plus")
def deeplabv3plus(
    num_classes: int,
    in_channels: int = 3,
    encoder: str = "resnet50",
    encoder_weights: str | os.PathLike[str] | None = None,
    encoder_kwargs: Mapping[str, object] | None = None,
    channels: int = 256,
    dilations: Sequence[int] | None = None,
    separable: bool = False,
    dropout: float = 0.1,
) -> EncoderDecoder:
    """:class:`~anchorlearn.models.heads.DeepLabV3PlusHead` on ``encoder`` (ResNet-50 at
    output stride 8: ASPP rates 12, 24, 36)."""
    return _build(
        lambda ch, st: DeepLabV3PlusHead(
            ch,
            st,
            num_classes,
            channels=channels,
            dilations=dilations,
            separable=separable,
            dropout=dropout,
        ),
        num_classes=num_classes,
        in_channels=in_channels,
        encoder=encoder,
        encoder_weights=encoder_weights,
        encoder_kwargs=encoder_kwargs,
    )


@register_model("mlp_head")
def mlp_head(
    num_classes: int,
    in_channels: int = 3,
    encoder: str = "efficientnet_lite0",
    encoder_weights: str | os.PathLike[str] | None = None,
    encoder_kwargs: Mapping[str, object] | None = None,
    channels: int = 256,
    dropout: float = 0.1,
) -> EncoderDecoder:
    """:class:`~anchorlearn.models.heads.MLPHead` (SegFormer's decoder) on ``encoder``."""
    return _build(
        lambda ch, st: MLPHead(ch, st, num_classes, channels=channels, dropout=dropout),
        num_classes=num_classes,
        in_channels=in_channels,
        encoder=encoder,
        encoder_weights=encoder_weights,
        encoder_kwargs=encoder_kwargs,
    )
