"""A fixed simplex equiangular tight frame (ETF) classifier, and a model that uses it.

Yang et al., "Inducing Neural Collapse in Imbalanced Learning: Do We Really Need a Learnable
Classifier at the End of Deep Neural Network?", NeurIPS 2022. The classifier's class vectors
are fixed in advance at the vertices of a regular simplex (maximally and equally separated);
:class:`~anchorlearn.losses.DotRegressionLoss` regresses the features onto the vector of
their class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from anchorlearn._checks import check_float_tensor
from anchorlearn._geometry import riesz_uniform_points, simplex_etf
from anchorlearn.models._layers import FeatureBatchNorm

__all__ = ["GEOMETRIES", "ETFClassifier", "FixedETFModel", "simplex_etf"]

# the fixed class vectors: a simplex ETF (Yang et al. 2022), or points spread uniformly on
# the hypersphere by minimising a Riesz energy, which also exist for C > D + 1 (the fixed
# hyperspherical prototypes of Mettes et al., "Hyperspherical Prototype Networks",
# NeurIPS 2019)
GEOMETRIES = ("etf", "uniform")


class ETFClassifier(nn.Module):
    r"""A linear classifier (or 1x1 convolution) whose weight is a fixed simplex ETF.

    ``weight`` is a ``(C, D)`` buffer (not a parameter, never trained; saved in
    ``state_dict``), the transpose of :func:`simplex_etf`'s ``M``: rows have unit norm and
    pairwise cosine :math:`-1/(C-1)`. Logits are :math:`z = W h (+ b)`.

    Input ``(N, D)`` gives ``(N, C)``; ``(B, D, H, W)`` gives ``(B, C, H, W)``. A ``(C, D)``
    input gives ``(C, C)``, so the module can serve as SAR's classifier for the anchors.

    With ``geometry="uniform"`` the rows are instead ``C`` unit vectors spread uniformly
    on the sphere (:func:`anchorlearn._geometry.riesz_uniform_points`): the same frame
    up to numerical precision when ``C <= D + 1``, and fixed hyperspherical prototypes
    (Mettes et al. 2019) when ``C > D + 1``, where no simplex ETF exists.

    Args:
        feat_dim: feature channels ``D`` (``>= num_classes`` for ``"etf"``).
        num_classes: number of classes ``C`` (>= 2).
        bias: add a learnable bias ``(C,)``, initialised to zero.
        seed: seed of the random orthogonal basis ``U`` (of the starting points for
            ``"uniform"``).
        geometry: ``"etf"`` or ``"uniform"``.
    """

    weight: torch.Tensor

    def __init__(
        self,
        feat_dim: int,
        num_classes: int,
        *,
        bias: bool = False,
        seed: int = 0,
        geometry: str = "etf",
    ) -> None:
        super().__init__()
        if geometry not in GEOMETRIES:
            raise ValueError(f"geometry must be one of {list(GEOMETRIES)}, got {geometry!r}")
        if geometry == "etf":
            rows = simplex_etf(feat_dim, num_classes, seed=seed).T
        else:
            rows = riesz_uniform_points(num_classes, feat_dim, seed=seed)
        self.feat_dim = feat_dim
        self.num_classes = num_classes
        self.geometry = geometry
        self.register_buffer("weight", rows.contiguous().to(torch.get_default_dtype()))
        self.bias = nn.Parameter(torch.zeros(num_classes)) if bias else None

    def extra_repr(self) -> str:
        return (
            f"feat_dim={self.feat_dim}, num_classes={self.num_classes}, "
            f"bias={self.bias is not None}, geometry={self.geometry!r}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, C)`` from ``x`` ``(N, D)``, or ``(B, C, H, W)`` from ``(B, D, H, W)``."""
        check_float_tensor(x, "x")
        if x.ndim not in (2, 4) or x.shape[1] != self.feat_dim:
            raise ValueError(
                f"x must have shape (N, {self.feat_dim}) or (B, {self.feat_dim}, H, W), "
                f"got {tuple(x.shape)}"
            )
        weight = self.weight if torch.is_autocast_enabled(x.device.type) else self.weight.to(x)
        bias = self.bias
        if bias is not None and not torch.is_autocast_enabled(x.device.type):
            bias = bias.to(x)
        if x.ndim == 2:
            return F.linear(x, weight, bias)
        return F.conv2d(x, weight[:, :, None, None], bias)


class FixedETFModel(nn.Module):
    """Wraps a ``(logits, features)`` model so that it classifies with a fixed simplex ETF.

    The wrapped model's own classifier is replaced by ``nn.Identity`` (its output is not
    used); its features go through a learnable batch normalisation (``BatchNorm1d`` for
    ``(N, D)`` features, also for a last batch of one row; ``BatchNorm2d`` for
    ``(B, D, H, W)``) and then the
    :class:`ETFClassifier`. The normalised features are the ones
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
        geometry: the fixed class vectors, ``"etf"`` or ``"uniform"`` (see
            :class:`ETFClassifier`).
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        *,
        dense: bool = False,
        seed: int = 0,
        geometry: str = "etf",
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
        self.classifier = ETFClassifier(feat_dim, num_classes, seed=seed, geometry=geometry)
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
