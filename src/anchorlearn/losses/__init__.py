"""Losses and regularizers. Torch only: importing this package pulls in nothing else.

Every loss returns a dict with ``"loss"`` (the weighted total) and each named term, always
present, so that loss keys agree across steps and DDP ranks.
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
