"""Losses and regularizers. Torch only: importing this package pulls in nothing else.

Every loss returns a dict with ``"loss"`` (the weighted total) and each named term, always
present, so that loss keys agree across steps and DDP ranks.

Every loss computes in float32 (float64 inputs stay float64) whatever the dtype of its
inputs and the autocast state, and returns terms of that dtype: float16 and bfloat16 inputs
are upcast before any sum, square or exponential, where a batch would overflow float16. An
inactive term is a zero still connected to the inputs' graph (never ``inputs.sum() * 0``,
which is NaN once the sum overflows).

The losses that keep class anchors, prototypes, centres or fixed targets (SAR, EMA
prototypes, center loss, the TSC targets, the CeCo ETF) return them with
``reference_points()``: a name and a ``(C, D)`` float32 CPU tensor, or ``None`` while they
have none.
"""

from .contrastive import InfoNCE, ProtoNCE
from .etf import DotRegressionLoss
from .fixed_targets import CenterCollapseLoss, TargetedContrastiveLoss
from .long_tail import BalancedSoftmaxLoss, CrossEntropyLoss, LDAMLoss, LogitAdjustedLoss
from .pauc import AlignmentLoss, CorrelationLoss, PAUCLoss, PAUCParameters, UniformityLoss
from .prototypes import CenterLoss, EMAPrototypeLoss
from .sar import SemanticAnchorRegularizer, class_balanced_weights, default_projector

__all__ = [
    "AlignmentLoss",
    "BalancedSoftmaxLoss",
    "CenterCollapseLoss",
    "CenterLoss",
    "CorrelationLoss",
    "CrossEntropyLoss",
    "DotRegressionLoss",
    "EMAPrototypeLoss",
    "InfoNCE",
    "LDAMLoss",
    "LogitAdjustedLoss",
    "PAUCLoss",
    "PAUCParameters",
    "ProtoNCE",
    "SemanticAnchorRegularizer",
    "TargetedContrastiveLoss",
    "UniformityLoss",
    "class_balanced_weights",
    "default_projector",
]
