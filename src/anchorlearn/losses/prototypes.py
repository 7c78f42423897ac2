"""Prototypes derived from the features being learned: the baselines SAR argues against.

* :class:`EMAPrototypeLoss`: per-class exponential moving averages of the features, with a
  pull of every feature towards its class prototype.
* :class:`CenterLoss`: learnable class centres trained jointly with the features
  (Wen et al., "A Discriminative Feature Learning Approach for Deep Face Recognition",
  ECCV 2016).

Both accept features ``(N, D)`` with labels ``(N,)``, or dense features ``(B, D, H, W)`` with
labels ``(B, H', W')`` that are resized to ``(H, W)`` by nearest neighbour. Positions whose
label equals ``ignore_index`` contribute nothing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from anchorlearn._checks import (
    check_ignore_index,
    check_non_negative,
    check_num_classes,
    check_positive_int,
    check_probability,
    labelled_rows,
    loss_compute_dtype,
)
from anchorlearn._dist import is_distributed

__all__ = ["CenterLoss", "EMAPrototypeLoss"]


class EMAPrototypeLoss(nn.Module):
    r"""Pull features towards exponential-moving-average class prototypes.

    The feature-derived prototype baseline. Buffers (saved in ``state_dict``, moved by
    ``.to()``): ``prototypes`` ``(C, D)`` and ``initialized`` ``(C,)`` (bool).

    In training mode every call first updates the prototypes from the detached features.
    With :math:`s_c = \sum_{i: y_i = c} f_i` and :math:`n_c = |\{i: y_i = c\}|` over the valid
    positions (summed over all ranks with ``all_reduce`` when ``torch.distributed`` is
    initialised, so every rank holds the same prototypes), each class present in the batch
    gets :math:`\mu_c = s_c / n_c` and

    .. math::
        p_c \leftarrow \begin{cases} \mu_c & \text{first time } c \text{ is seen} \\
        m\, p_c + (1 - m)\, \mu_c & \text{afterwards.} \end{cases}

    Classes absent from the batch keep their prototype. In eval mode nothing is updated.
    The pull term then uses the prototypes as they stand after this step's update:

    .. math::
        \mathcal{L}_\text{pull} = w \cdot \frac{1}{|V|} \sum_{i \in V}
        \frac{\lVert f_i - p_{y_i} \rVert_2^2}{D},

    where :math:`V` are the valid positions whose class prototype is initialised. The
    prototypes are constants: the gradient reaches only the features.

    Under ``torch.distributed`` every rank must call ``forward`` in training mode the same
    number of times (the update is a collective operation), even on an empty batch.

    Args:
        num_classes: number of classes ``C`` (>= 2).
        feat_dim: feature channels ``D``.
        weight: multiplier ``w`` of the pull term.
        momentum: EMA momentum ``m`` in ``[0, 1]``; ``0`` replaces a prototype by the batch
            mean, ``1`` freezes it after its first update.
        ignore_index: label ignored in ``labels`` (``None``: every label is a class).
    """

    prototypes: torch.Tensor
    initialized: torch.Tensor

    def __init__(
        self,
        num_classes: int,
        feat_dim: int,
        *,
        weight: float = 0.1,
        momentum: float = 0.9,
        ignore_index: int | None = 255,
    ) -> None:
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        self.feat_dim = check_positive_int(feat_dim, "feat_dim")
        self.weight = check_non_negative(weight, "weight")
        self.momentum = check_probability(momentum, "momentum")
        self.ignore_index = check_ignore_index(ignore_index)
        self.register_buffer("prototypes", torch.zeros(num_classes, feat_dim))
        self.register_buffer("initialized", torch.zeros(num_classes, dtype=torch.bool))

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, feat_dim={self.feat_dim}, weight={self.weight}, "
            f"momentum={self.momentum}, ignore_index={self.ignore_index}"
        )

    def reference_points(self) -> tuple[str, torch.Tensor]:
        """``("EMA prototypes", P)``, ``P`` a detached float32 CPU copy ``(C, D)`` of the
        prototypes (zero rows for classes not seen yet)."""
        return "EMA prototypes", self.prototypes.detach().float().cpu().clone()

    @torch.no_grad()
    def _update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """EMA update from valid ``features`` ``(M, D)`` with class ``labels`` ``(M,)``.

        Class sums, counts and the blend are computed in float32 (float64 for float64
        buffers), then stored in the buffers' dtype: class sums of a float16 batch overflow
        float16. The dtype depends on the buffers only, so every rank all-reduces alike.
        """
        dtype = loss_compute_dtype(self.prototypes.dtype)
        stats = torch.zeros(
            self.num_classes, self.feat_dim + 1, dtype=dtype, device=self.prototypes.device
        )
        stats[:, : self.feat_dim].index_add_(0, labels, features.detach().to(dtype))
        stats[:, self.feat_dim].index_add_(0, labels, torch.ones_like(labels, dtype=dtype))
        if is_distributed():
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        counts = stats[:, self.feat_dim]
        present = counts > 0
        means = stats[:, : self.feat_dim] / counts.clamp_min(1.0)[:, None]
        previous = self.prototypes.to(dtype)
        blended = self.momentum * previous + (1.0 - self.momentum) * means
        updated = torch.where(self.initialized[:, None], blended, means)
        self.prototypes.copy_(torch.where(present[:, None], updated, previous))
        self.initialized |= present

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Update the prototypes (training mode only) and return the pull loss.

        Args:
            features: ``(N, D)`` or ``(B, D, H, W)``, floating point.
            labels: ``(N,)`` or ``(B, H', W')``, integer class indices or ``ignore_index``.

        Returns:
            ``{"loss": w * pull, "pull": pull}``, scalars (``pull`` unweighted); a finite
            zero connected to ``features`` when no valid position has an initialised
            prototype.
        """
        feats, targets = labelled_rows(
            features,
            labels,
            feat_dim=self.feat_dim,
            num_classes=self.num_classes,
            ignore_index=self.ignore_index,
        )
        if self.training:
            self._update(feats, targets)
        known = self.initialized[targets]
        feats, targets = feats[known], targets[known]
        dtype = loss_compute_dtype(feats.dtype, self.prototypes.dtype)
        anchors = self.prototypes[targets].to(dtype)
        sq_dist = (feats.to(dtype) - anchors).pow(2).sum(dim=1) / self.feat_dim
        pull = sq_dist.sum() / max(targets.numel(), 1)
        return {"loss": self.weight * pull, "pull": pull}


class CenterLoss(nn.Module):
    r"""Center loss (Wen et al., ECCV 2016) with centres learned by gradient descent.

    Parameter ``centers`` ``(C, D)``, initialised from :math:`\mathcal{N}(0, 1)`. Over the
    valid positions :math:`V`,

    .. math::
        \mathcal{L}_C = w \cdot \frac{1}{2} \cdot \frac{1}{|V|} \sum_{i \in V}
        \lVert f_i - c_{y_i} \rVert_2^2 .

    Normalisation: the squared distance is summed over the ``D`` channels (not averaged, as
    in the paper) and averaged over positions (the paper sums over the mini-batch; the mean
    keeps ``w`` independent of batch size and resolution). The gradient reaches both the
    features and the centres; the paper's separate centre-update rate :math:`\alpha` is
    replaced by the optimiser's learning rate on ``centers``.

    Args:
        num_classes: number of classes ``C`` (>= 2).
        feat_dim: feature channels ``D``.
        weight: multiplier ``w`` (the paper's :math:`\lambda`).
        ignore_index: label ignored in ``labels`` (``None``: every label is a class).
    """

    def __init__(
        self,
        num_classes: int,
        feat_dim: int,
        *,
        weight: float = 0.01,
        ignore_index: int | None = 255,
    ) -> None:
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        self.feat_dim = check_positive_int(feat_dim, "feat_dim")
        self.weight = check_non_negative(weight, "weight")
        self.ignore_index = check_ignore_index(ignore_index)
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, feat_dim={self.feat_dim}, weight={self.weight}, "
            f"ignore_index={self.ignore_index}"
        )

    def reference_points(self) -> tuple[str, torch.Tensor]:
        """``("centres", M)``, ``M`` a detached float32 CPU copy ``(C, D)`` of the centres."""
        return "centres", self.centers.detach().float().cpu().clone()

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return the weighted center loss.

        Args:
            features: ``(N, D)`` or ``(B, D, H, W)``, floating point.
            labels: ``(N,)`` or ``(B, H', W')``, integer class indices or ``ignore_index``.

        Returns:
            ``{"loss": w * center, "center": center}``, scalars (``center`` is
            L_C / w, unweighted); a finite zero connected to ``features``
            and ``centers`` when every position is ignored.
        """
        feats, targets = labelled_rows(
            features,
            labels,
            feat_dim=self.feat_dim,
            num_classes=self.num_classes,
            ignore_index=self.ignore_index,
        )
        dtype = loss_compute_dtype(feats.dtype, self.centers.dtype)
        sq_dist = (feats.to(dtype) - self.centers[targets].to(dtype)).pow(2).sum(dim=1)
        center = 0.5 * sq_dist.sum() / max(targets.numel(), 1)
        return {"loss": self.weight * center, "center": center}
