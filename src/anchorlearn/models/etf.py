"""A model whose classifier is a fixed simplex ETF, behind a feature normalisation layer."""

from __future__ import annotations

import torch
from torch import nn

from anchorlearn.losses.etf import ETFClassifier
from anchorlearn.models._layers import FeatureBatchNorm

__all__ = ["FixedETFModel"]


class FixedETFModel(nn.Module):
    """Wraps a ``(logits, features)`` model so that it classifies with a fixed simplex ETF.

    The wrapped model's own classifier is replaced by ``nn.Identity`` (its output is not
    used); its features go through a learnable batch normalisation (``BatchNorm1d`` for
    ``(N, D)`` features, also for a last batch of one row; ``BatchNorm2d`` for
    ``(B, D, H, W)``) and then the
    :class:`~anchorlearn.losses.ETFClassifier`. The normalised features are the ones
    returned, so a dot-regression loss or a regularizer reads what the ETF classifies.

    Why the normalisation: backbone features taken after a ReLU (and average pooling) are
    non-negative, while every ETF direction has negative entries, so un-normalised features
    can never align with their class vector and the tail classes are lost. Yang et al.
    (NeurIPS 2022) likewise batch-normalise the features in front of their ETF classifier.

    Args:
        model: returns ``(logits, features)`` and exposes ``feat_dim`` and ``classifier``.
        num_classes: number of classes ``C`` (``<= feat_dim``).
        dense: the features are ``(B, D, H, W)`` maps (segmentation).
        seed: seed of the ETF's random orthogonal basis.
    """

    def __init__(
        self, model: nn.Module, num_classes: int, *, dense: bool = False, seed: int = 0
    ) -> None:
        super().__init__()
        feat_dim = getattr(model, "feat_dim", None)
        if not isinstance(feat_dim, int):
            raise TypeError(f"model must expose an int feat_dim, got {feat_dim!r}")
        if not isinstance(getattr(model, "classifier", None), nn.Module):
            raise TypeError("model must expose its final layer as a `classifier` module")
        model.classifier = nn.Identity()
        self.backbone = model
        self.feat_dim = feat_dim
        self.num_classes = num_classes
        self.norm = nn.BatchNorm2d(feat_dim) if dense else FeatureBatchNorm(feat_dim)
        self.classifier = ETFClassifier(feat_dim, num_classes, seed=seed)
        # what the engine reads off an encoder-decoder model: its input normalisation
        for name in ("input_mean", "input_std"):
            if hasattr(model, name):
                setattr(self, name, getattr(model, name))

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The wrapped model's ``"backbone"`` group (when it has one) and everything else
        (its head, the normalisation) as ``"head"``; the ETF itself has no parameters."""
        if not hasattr(self.backbone, "param_groups"):
            raise AttributeError(f"{type(self.backbone).__name__} has no param_groups()")
        backbone = self.backbone.param_groups()["backbone"]
        ids = {id(p) for p in backbone}
        return {"backbone": backbone, "head": [p for p in self.parameters() if id(p) not in ids]}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised features of ``x``."""
        return self.norm(self.backbone(x)[1])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, normalised features)``."""
        features = self.forward_features(x)
        return self.classifier(features), features
