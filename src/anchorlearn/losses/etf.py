"""The dot-regression loss towards a fixed classifier, such as a simplex ETF.

Yang et al., "Inducing Neural Collapse in Imbalanced Learning: Do We Really Need a Learnable
Classifier at the End of Deep Neural Network?", NeurIPS 2022. The classifier's class vectors
are fixed in advance at the vertices of a regular simplex (maximally and equally separated;
:class:`anchorlearn.models.ETFClassifier`); the features are regressed onto the vector of
their class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from anchorlearn._checks import (
    check_finite,
    check_float_tensor,
    check_ignore_index,
    check_num_classes,
    labelled_rows,
    loss_compute_dtype,
)

__all__ = ["DotRegressionLoss"]


class DotRegressionLoss(nn.Module):
    r"""Dot-regression loss towards a fixed ETF classifier (Yang et al., NeurIPS 2022).

    With :math:`\hat h = h / \lVert h \rVert_2` and :math:`\hat w_y = w_y / \lVert w_y \rVert_2`
    the (normalised) classifier vector of the true class,

    .. math::
        \mathcal{L}_\text{DR} = \frac{1}{|V|} \sum_{i \in V}
        \frac{1}{2} \left(\hat w_{y_i}^\top \hat h_i - 1\right)^2

    over the valid positions :math:`V`. Only the features receive gradient; the classifier is
    copied into the ``weight`` buffer ``(C, D)`` (row-normalised) at construction.

    Args:
        etf_weight: the fixed classifier's weight ``(C, D)``, e.g.
            ``ETFClassifier(D, C).weight`` (:class:`anchorlearn.models.ETFClassifier`).
        ignore_index: label ignored in ``labels`` (``None``: every label is a class).
    """

    weight: torch.Tensor

    def __init__(self, etf_weight: torch.Tensor, *, ignore_index: int | None = 255) -> None:
        super().__init__()
        if isinstance(etf_weight, nn.Module):
            raise TypeError(
                f"etf_weight must be a (C, D) tensor, got the module "
                f"{type(etf_weight).__name__}: pass its .weight"
            )
        weight = check_float_tensor(etf_weight, "etf_weight")
        if weight.ndim != 2:
            raise ValueError(
                f"etf_weight must be a 2-D (C, D) tensor, got shape {tuple(weight.shape)}"
            )
        check_num_classes(weight.shape[0], "etf_weight.shape[0] (num_classes)")
        check_finite(weight, "etf_weight")
        self.ignore_index = check_ignore_index(ignore_index)
        self.num_classes, self.feat_dim = weight.shape
        self.register_buffer("weight", F.normalize(weight.detach().clone(), dim=1))

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, feat_dim={self.feat_dim}, "
            f"ignore_index={self.ignore_index}"
        )

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return the dot-regression loss.

        Args:
            features: ``(N, D)`` or ``(B, D, H, W)``, floating point.
            labels: ``(N,)`` or ``(B, H', W')``, integer class indices or ``ignore_index``.

        Returns:
            ``{"loss": L_DR, "dot_regression": L_DR}``, scalars; a finite zero connected to
            ``features`` when every position is ignored.
        """
        feats, targets = labelled_rows(
            features,
            labels,
            feat_dim=self.feat_dim,
            num_classes=self.num_classes,
            ignore_index=self.ignore_index,
        )
        dtype = loss_compute_dtype(feats.dtype, self.weight.dtype)
        directions = F.normalize(feats.to(dtype), dim=1)
        cosine = (directions * self.weight[targets].to(dtype)).sum(dim=1)
        loss = 0.5 * (cosine - 1.0).pow(2).sum() / max(targets.numel(), 1)
        return {"loss": loss, "dot_regression": loss}
