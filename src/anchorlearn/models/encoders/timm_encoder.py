"""Any timm model as an encoder: ``create_encoder("timm:<name>")``.

The model is ``timm.create_model(name, features_only=True, in_chans=in_channels, ...)``;
its feature maps are returned as a list, with :attr:`~TimmEncoder.out_channels` from
``feature_info.channels()``, :attr:`~TimmEncoder.strides` from ``feature_info.reduction()``
and the normalisation from the model's pretrained config (ImageNet statistics if it has
none). timm is an optional extra (``anchorlearn[timm]``); it imports torchvision, which is
imported through :func:`anchorlearn.models._torchvision_compat.import_torchvision`.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

import torch
from torch import nn

from anchorlearn.models._torchvision_compat import import_torchvision
from anchorlearn.models.encoders import IMAGENET_MEAN, IMAGENET_STD, Encoder, channel_statistics
from anchorlearn.models.pretrained import fit_state_dict, load_into, load_state_dict_file

__all__ = ["TimmEncoder", "create_timm_encoder", "import_timm"]

# create_model arguments that only the feature wrapper takes
_FEATURE_ARGS = ("out_indices", "feature_cls", "feature_cfg", "output_fmt")


def import_timm() -> ModuleType:
    """``import timm`` (torchvision first, see :mod:`anchorlearn.models._torchvision_compat`).

    Raises:
        ImportError: timm or torchvision is missing or cannot be imported; the message says
            what to install.
    """
    hint = (
        "install the extra anchorlearn[timm] (timm and the torchvision release for torch "
        f"{torch.__version__.split('+')[0]}) without letting pip replace torch"
    )
    try:
        import_torchvision()
        import timm
    except ImportError as error:
        raise ImportError(f"timm: encoders need timm and torchvision ({error}); {hint}") from error
    except RuntimeError as error:
        text = " ".join(str(error).split())[:200]
        raise ImportError(
            f"timm: encoders could not import timm/torchvision ({text}); {hint}"
        ) from error
    return timm


class TimmEncoder(Encoder):
    """Wraps a timm ``features_only`` model.

    Args:
        model: the output of ``timm.create_model(..., features_only=True)``.
        in_channels: the model's input channels.

    ``forward(x)`` with ``x`` ``(B, in_channels, H, W)`` returns the model's feature maps as
    a list, map ``i`` ``(B, out_channels[i], H / strides[i], W / strides[i])`` (how odd sizes
    round depends on the model; most convolutional ones round up).
    """

    def __init__(self, model: nn.Module, in_channels: int) -> None:
        super().__init__()
        info = getattr(model, "feature_info", None)
        if info is None or not callable(getattr(info, "channels", None)):
            raise TypeError(
                "model must be a timm features_only model with feature_info, "
                f"got {type(model).__name__}"
            )
        self.model = model
        self.in_channels = in_channels
        self.out_channels = tuple(int(c) for c in info.channels())
        self.strides = tuple(int(r) for r in info.reduction())
        config = getattr(model, "pretrained_cfg", None) or {}
        self.input_mean = channel_statistics(config.get("mean", IMAGENET_MEAN), in_channels)
        self.input_std = channel_statistics(config.get("std", IMAGENET_STD), in_channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The feature maps of ``x`` ``(B, in_channels, H, W)``."""
        return list(self.model(self.check_input(x)))


def _config_names(config: dict[str, Any], key: str) -> tuple[str, ...]:
    value = config.get(key) or ()
    return (value,) if isinstance(value, str) else tuple(value)


def _full_model(timm: ModuleType, name: str, in_channels: int, kwargs: dict[str, Any]) -> nn.Module:
    """The classification model ``name`` (on the meta device where it can be built there),
    whose key names the files of timm's checkpoints use."""
    kwargs = {k: v for k, v in kwargs.items() if k not in _FEATURE_ARGS}
    try:
        with torch.device("meta"):
            return timm.create_model(name, in_chans=in_channels, **kwargs)
    except (RuntimeError, NotImplementedError):
        return timm.create_model(name, in_chans=in_channels, **kwargs)


def create_timm_encoder(
    name: str,
    *,
    in_channels: int = 3,
    pretrained: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> TimmEncoder:
    """A :class:`TimmEncoder` of the timm model ``name``.

    Args:
        name: a timm model name (``timm.list_models()``), e.g. ``"resnet18"``.
        in_channels: image channels (timm's ``in_chans``).
        pretrained: ``None``; ``"imagenet"`` (timm's ``pretrained=True``: timm's / the
            Hugging Face cache, downloading if allowed; timm adapts the stem to
            ``in_channels`` itself); or the path of a weights file holding either the full
            timm model's state dict (its classifier is ignored; the stem is averaged for
            ``in_channels != 3``) or a saved :class:`TimmEncoder` / features-only model.
        kwargs: further ``timm.create_model`` arguments (``out_indices``,
            ``output_stride``, ...).

    Raises:
        ImportError: timm is not usable. ValueError: an unknown ``name`` or weights that do
        not fit. RuntimeError: timm could not obtain its pretrained weights.
    """
    timm = import_timm()
    if not timm.is_model(name):
        raise ValueError(f"name must be a timm model name (see timm.list_models()), got {name!r}")
    for key in ("features_only", "pretrained", "in_chans"):
        if key in kwargs:
            raise TypeError(
                f"{key} must not be passed: create_encoder sets it (features_only=True, "
                "pretrained and in_chans from its own arguments)"
            )
    if pretrained == "imagenet":
        try:
            model = timm.create_model(
                name, features_only=True, pretrained=True, in_chans=in_channels, **kwargs
            )
        except (RuntimeError, OSError) as error:  # no hub package, no network, no cache
            text = " ".join(str(error).split())[:200]
            raise RuntimeError(
                f"timm could not load the pretrained weights of {name!r} "
                f"({type(error).__name__}: {text}); without access to them pass "
                "pretrained=<path of a local weights file>"
            ) from error
        return TimmEncoder(model, in_channels)

    model = timm.create_model(name, features_only=True, in_chans=in_channels, **kwargs)
    if pretrained is None:
        return TimmEncoder(model, in_channels)
    state_dict = load_state_dict_file(pretrained)
    try:  # a state dict of this features-only model, e.g. a saved TimmEncoder
        load_into(model, state_dict)
        return TimmEncoder(model, in_channels)
    except ValueError:
        pass
    # a state dict of the classification model: check it against that model, then let timm
    # load it before wrapping (features-only models may rename modules)
    full = _full_model(timm, name, in_channels, kwargs)
    config = full.pretrained_cfg
    first_convs = _config_names(config, "first_conv")
    fitted, _ = fit_state_dict(
        full,
        state_dict,
        ignore=_config_names(config, "classifier"),
        input_conv=first_convs[0] + ".weight" if len(first_convs) == 1 else None,
    )
    model = timm.create_model(
        name,
        features_only=True,
        pretrained=True,
        in_chans=in_channels,
        pretrained_cfg_overlay={"state_dict": fitted},
        **kwargs,
    )
    model.pretrained_cfg.pop("state_dict", None)
    return TimmEncoder(model, in_channels)
