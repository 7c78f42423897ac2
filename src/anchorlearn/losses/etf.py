"""A fixed simplex equiangular tight frame (ETF) classifier and the dot-regression loss.

Yang et al., "Inducing Neural Collapse in Imbalanced Learning: Do We Really Need a Learnable
Classifier at the End of Deep Neural Network?", NeurIPS 2022. The classifier's class vectors
are fixed in advance at the vertices of a regular simplex (maximally and equally separated);
the features are regressed onto the vector of their class.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from anchorlearn.losses._checks import (
    check_finite,
    check_float_tensor,
    check_ignore_index,
    check_num_classes,
    check_positive_int,
    check_seed,
    labelled_rows,
    loss_compute_dtype,
)

__all__ = ["DotRegressionLoss", "ETFClassifier", "simplex_etf"]


def simplex_etf(feat_dim: int, num_classes: int, *, seed: int = 0) -> torch.Tensor:
    r"""Simplex ETF ``M`` of shape ``(D, C)`` (float64), one unit-norm column per class.

    .. math::
        M = \sqrt{\tfrac{C}{C-1}}\; U \left(I_C - \tfrac{1}{C} \mathbf{1}\mathbf{1}^\top\right),

    with :math:`U \in \mathbb{R}^{D \times C}` a random partial orthogonal matrix
    (:math:`U^\top U = I_C`), the Q factor of a QR decomposition of a Gaussian matrix drawn
    from a generator seeded with ``seed``. Every column has unit norm and any two columns have
    cosine exactly :math:`-1/(C-1)`. The construction needs ``D >= C``.
    """
    num_classes = check_num_classes(num_classes)
    feat_dim = check_positive_int(feat_dim, "feat_dim")
    if feat_dim < num_classes:
        raise ValueError(
            f"feat_dim must be >= num_classes for a simplex ETF built from a D x C partial "
            f"orthogonal matrix, got feat_dim={feat_dim} < num_classes={num_classes}"
        )
    generator = torch.Generator().manual_seed(check_seed(seed, optional=False))
    gaussian = torch.randn(feat_dim, num_classes, generator=generator, dtype=torch.float64)
    orthonormal, _ = torch.linalg.qr(gaussian, mode="reduced")
    centering = torch.eye(num_classes, dtype=torch.float64) - 1.0 / num_classes
    return math.sqrt(num_classes / (num_classes - 1)) * orthonormal @ centering


class ETFClassifier(nn.Module):
    r"""A linear classifier (or 1x1 convolution) whose weight is a fixed simplex ETF.

    ``weight`` is a ``(C, D)`` buffer (not a parameter, never trained; saved in
    ``state_dict``), the transpose of :func:`simplex_etf`'s ``M``: rows have unit norm and
    pairwise cosine :math:`-1/(C-1)`. Logits are :math:`z = W h (+ b)`.

    Input ``(N, D)`` gives ``(N, C)``; ``(B, D, H, W)`` gives ``(B, C, H, W)``. A ``(C, D)``
    input gives ``(C, C)``, so the module can serve as SAR's classifier for the anchors.

    Args:
        feat_dim: feature channels ``D`` (``>= num_classes``).
        num_classes: number of classes ``C`` (>= 2).
        bias: add a learnable bias ``(C,)``, initialised to zero.
        seed: seed of the random orthogonal basis ``U``.
    """

    weight: torch.Tensor

    def __init__(
        self, feat_dim: int, num_classes: int, *, bias: bool = False, seed: int = 0
    ) -> None:
        super().__init__()
        frame = simplex_etf(feat_dim, num_classes, seed=seed)
        self.feat_dim = feat_dim
        self.num_classes = num_classes
        self.register_buffer("weight", frame.T.contiguous().to(torch.get_default_dtype()))
        self.bias = nn.Parameter(torch.zeros(num_classes)) if bias else None

    def extra_repr(self) -> str:
        return (
            f"feat_dim={self.feat_dim}, num_classes={self.num_classes}, "
            f"bias={self.bias is not None}"
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
        etf: an :class:`ETFClassifier`, or its weight as a ``(C, D)`` tensor.
        ignore_index: label ignored in ``labels`` (``None``: every label is a class).
    """

    weight: torch.Tensor

    def __init__(
        self, etf: ETFClassifier | torch.Tensor, *, ignore_index: int | None = 255
    ) -> None:
        super().__init__()
        if isinstance(etf, ETFClassifier):
            weight = etf.weight
        elif isinstance(etf, torch.Tensor):
            weight = check_float_tensor(etf, "etf")
            if weight.ndim != 2:
                raise ValueError(
                    f"etf must be an ETFClassifier or a 2-D (C, D) weight tensor, "
                    f"got shape {tuple(weight.shape)}"
                )
            check_num_classes(weight.shape[0], "etf.shape[0] (num_classes)")
            check_finite(weight, "etf")
        else:
            raise TypeError(
                f"etf must be an ETFClassifier or a (C, D) tensor, got {type(etf).__name__}"
            )
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
