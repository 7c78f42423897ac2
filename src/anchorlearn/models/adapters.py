"""Adapters that make timm and segmentation-models-pytorch networks return
``(logits, features)`` and expose ``classifier``, ``feat_dim`` and ``num_classes``.

Both libraries are optional extras; building an adapter without them installed raises an
``ImportError`` that names the package to install. Reach them through
:func:`anchorlearn.models.create_model` with ``"timm:<name>"`` or ``"smp:<arch>:<encoder>"``.
"""

from __future__ import annotations

import importlib
import inspect
from types import ModuleType

import torch
from torch import nn

from anchorlearn._checks import check_num_classes, check_positive_int

__all__ = [
    "SmpSegmentationAdapter",
    "TimmClassifierAdapter",
    "create_smp_model",
    "create_timm_model",
]


def _import_optional(module: str, package: str) -> ModuleType:
    # both packages import torchvision, which must be the build made for the installed torch
    hint = (
        f"install it with `pip install {package} torchvision==<the release for torch "
        f"{torch.__version__.split('+')[0]}>` and the same torch index as torch, so that pip "
        "does not replace torch"
    )
    from anchorlearn.models._torchvision_compat import torchvision_importable_if_installed

    try:
        torchvision_importable_if_installed()
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"this model needs the optional package {package!r}; {hint}") from error
    except RuntimeError as error:  # e.g. a torchvision built for another torch
        raise ImportError(
            f"importing {package!r} failed ({' '.join(str(error).split())[:200]}); "
            f"reinstall it: {hint}"
        ) from error


class TimmClassifierAdapter(nn.Module):
    """Wraps a timm classifier: features are the pre-logits vector ``(B, D)`` that timm's
    ``forward_head(..., pre_logits=True)`` returns, ``classifier`` is the model's final
    ``nn.Linear`` (``get_classifier()``), and ``forward`` returns ``(logits (B, C),
    features (B, D))`` with ``logits == classifier(features)``.
    """

    def __init__(self, model: nn.Module, num_classes: int) -> None:
        super().__init__()
        classifier = model.get_classifier()
        if not isinstance(classifier, nn.Linear):
            raise ValueError(
                f"model must end in an nn.Linear classifier, got {type(classifier).__name__}"
            )
        self.model = model
        self.classifier = classifier
        self.feat_dim = classifier.in_features
        self.num_classes = num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-logits features ``(B, D)`` of images ``(B, in_channels, H, W)``."""
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits (B, C), features (B, D))``."""
        features = self.forward_features(x)
        return self.classifier(features), features


class SmpSegmentationAdapter(nn.Module):
    """Wraps a segmentation-models-pytorch network.

    smp's segmentation head (a 3x3 conv, possibly followed by upsampling) is replaced by an
    FCN-style 1x1 ``classifier``; the features are the decoder output ``(B, D, h, w)`` and
    the logits ``(B, C, h, w)`` stay at that resolution (the engine upsamples them).
    """

    def __init__(self, model: nn.Module, num_classes: int) -> None:
        super().__init__()
        head_conv = model.segmentation_head[0]
        if not isinstance(head_conv, nn.Conv2d):
            raise ValueError(
                "model.segmentation_head must start with an nn.Conv2d, "
                f"got {type(head_conv).__name__}"
            )
        self.encoder = model.encoder
        self.decoder = model.decoder
        self.feat_dim = head_conv.in_channels
        self.num_classes = num_classes
        self.classifier = nn.Conv2d(self.feat_dim, num_classes, 1)
        parameters = inspect.signature(self.decoder.forward).parameters.values()
        self._unpack = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Decoder output ``(B, D, h, w)`` of images ``(B, in_channels, H, W)``."""
        encoded = self.encoder(x)
        return self.decoder(*encoded) if self._unpack else self.decoder(encoded)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits (B, C, h, w), features (B, D, h, w))``."""
        features = self.forward_features(x)
        return self.classifier(features), features


def create_timm_model(
    name: str, num_classes: int = 10, in_channels: int = 3, pretrained: bool = False
) -> TimmClassifierAdapter:
    """``timm.create_model(name, ...)`` wrapped in a :class:`TimmClassifierAdapter`."""
    timm = _import_optional("timm", "timm")
    check_num_classes(num_classes)
    check_positive_int(in_channels, "in_channels")
    model = timm.create_model(
        name, pretrained=pretrained, num_classes=num_classes, in_chans=in_channels
    )
    return TimmClassifierAdapter(model, num_classes)


def create_smp_model(
    arch: str,
    encoder: str,
    num_classes: int = 21,
    in_channels: int = 3,
    encoder_weights: str | None = None,
) -> SmpSegmentationAdapter:
    """``smp.create_model(arch, encoder, ...)`` wrapped in a :class:`SmpSegmentationAdapter`."""
    smp = _import_optional("segmentation_models_pytorch", "segmentation-models-pytorch")
    check_num_classes(num_classes)
    check_positive_int(in_channels, "in_channels")
    model = smp.create_model(
        arch,
        encoder_name=encoder,
        encoder_weights=encoder_weights,
        in_channels=in_channels,
        classes=num_classes,
    )
    return SmpSegmentationAdapter(model, num_classes)
