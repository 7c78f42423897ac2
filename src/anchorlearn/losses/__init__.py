"""Losses and regularizers. Torch only: importing this package pulls in nothing else.

Every loss returns a dict with ``"loss"`` (the weighted total) and each named term, always
present, so that loss keys agree across steps and DDP ranks.

Every loss computes in float32 (float64 inputs stay float64) whatever the dtype of its
inputs and the autocast state, and returns terms of that dtype: float16 and bfloat16 inputs
are upcast before any sum, square or exponential, where a batch would overflow float16. An
inactive term is a zero still connected to the inputs' graph (never ``inputs.sum() * 0``,
which is NaN once the sum overflows).
"""

from .contrastive import InfoNCE, ProtoNCE
from .etf import DotRegressionLoss, ETFClassifier, simplex_etf
from .long_tail import BalancedSoftmaxLoss, CrossEntropyLoss, LogitAdjustedLoss
from .pauc import AlignmentLoss, CorrelationLoss, PAUCLoss, UniformityLoss
from .prototypes import CenterLoss, EMAPrototypeLoss
from .sar import SemanticAnchorRegularizer, default_projector

__all__ = [
    "AlignmentLoss",
    "BalancedSoftmaxLoss",
    "CenterLoss",
    "CorrelationLoss",
    "CrossEntropyLoss",
    "DotRegressionLoss",
    "EMAPrototypeLoss",
    "ETFClassifier",
    "InfoNCE",
    "LogitAdjustedLoss",
    "PAUCLoss",
    "ProtoNCE",
    "SemanticAnchorRegularizer",
    "UniformityLoss",
    "default_projector",
    "simplex_etf",
]
