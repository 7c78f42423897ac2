"""Fixed-target baselines: class targets placed on the sphere in advance, never learned.

* :class:`TargetedContrastiveLoss`: TSC-style targets spread uniformly on the unit
  hypersphere and matched to the classes by the Hungarian algorithm (Li et al., "Targeted
  Supervised Contrastive Learning for Long-Tailed Recognition", CVPR 2022).
* :class:`CenterCollapseLoss`: CeCo-style classification of the batch's class centres by a
  fixed simplex-ETF classifier (Zhong et al., "Understanding Imbalanced Semantic Segmentation
  Through Neural Collapse", CVPR 2023).

Unlike SAR (:mod:`anchorlearn.losses.sar`), whose anchors are made semantic through the task's
classifier, these targets are pure geometry: only their assignment to classes (TSC) depends
on the data. Both accept features ``(N, D)`` with labels ``(N,)``, or dense features
``(B, D, H, W)`` with labels ``(B, H', W')`` resized to ``(H, W)`` by nearest neighbour;
positions labelled ``ignore_index`` contribute nothing.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from anchorlearn._checks import (
    autocast_off,
    check_ignore_index,
    check_non_negative,
    check_num_classes,
    check_positive,
    check_positive_int,
    check_probability,
    check_seed,
    connected_zero,
    labelled_rows,
    loss_compute_dtype,
)
from anchorlearn._dist import is_distributed
from anchorlearn._geometry import riesz_uniform_points, seed_or_draw, simplex_etf

__all__ = ["CenterCollapseLoss", "TargetedContrastiveLoss"]


def _check_same_device(features: torch.Tensor, buffer: torch.Tensor, owner: str) -> None:
    if features.device != buffer.device:
        raise ValueError(
            f"features are on {features.device} but {owner} is on {buffer.device}: "
            "move it with .to(device)"
        )


def _rows(
    loss: nn.Module, features: torch.Tensor, labels: torch.Tensor, buffer: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """The labelled rows ``(M, D)`` of ``features`` and their classes ``(M,)``
    (:func:`labelled_rows`, with ``loss``'s ``feat_dim``, ``num_classes`` and
    ``ignore_index``), checked to be on ``buffer``'s device, and the dtype to compute in."""
    feats, classes = labelled_rows(
        features,
        labels,
        feat_dim=loss.feat_dim,
        num_classes=loss.num_classes,
        ignore_index=loss.ignore_index,
    )
    _check_same_device(features, buffer, type(loss).__name__)
    return feats, classes, loss_compute_dtype(feats.dtype, buffer.dtype)


class TargetedContrastiveLoss(nn.Module):
    r"""TSC-style loss towards fixed, uniformly spread class targets (Li et al., CVPR 2022).

    Targeted supervised contrastive learning fixes, before training, ``C`` target points
    spread as evenly as possible over the unit hypersphere, so that every class, however rare,
    is promised an equally separated region of feature space; which target a class gets is
    decided during training by matching the classes' current feature centres to the targets
    so as to move the features as little as possible. This module implements the target term
    of that method only (the batch supervised-contrastive term is left to
    :mod:`anchorlearn.losses.contrastive`):

    1. Targets ``T`` ``(C, D)``: :func:`anchorlearn._geometry.riesz_uniform_points` (unit rows
       minimising the Riesz 1-energy; for ``C <= D + 1`` a regular simplex), drawn once from
       ``seed``. Buffer ``targets``.
    2. Centres (training mode only, detached): with :math:`\hat f = f / \lVert f \rVert` and,
       for each class ``c`` present in the batch, :math:`\mu_c` the *normalised* mean of the
       :math:`\hat f_i` of class ``c``,
       ``centers[c] <- mu_c`` the first time ``c`` is seen and
       ``centers[c] <- m centers[c] + (1 - m) mu_c`` afterwards (``m = momentum``); classes
       absent from the batch keep their centre. Buffers ``centers`` ``(C, D)`` and
       ``initialized`` ``(C,)`` (bool).
    3. Assignment (training mode, on the first step and then every ``assign_every`` steps:
       when ``step % assign_every == 0`` before the step counts): the Hungarian algorithm
       (``scipy.optimize.linear_sum_assignment`` on the negative cosines between the
       normalised centres and the targets) picks the one-to-one class -> target map that
       maximises the total cosine. Classes never seen have a zero centre (cosine 0 with every
       target) and take the targets left over. Buffer ``assignment`` ``(C,)`` long
       (``assignment[c]`` is the index of class ``c``'s target; the identity until the first
       assignment); ``step`` counts training calls. All are saved in ``state_dict``.
    4. Loss over the valid positions :math:`V`, using the assignment as it stands after this
       step's update:

       .. math::
           \mathcal{L} = w \cdot \frac{1}{|V|} \sum_{i \in V}
           \mathrm{CE}\!\left(\frac{\hat f_i T^\top}{\tau},\; a_{y_i}\right).

       The gradient reaches only the features; the targets are constants.

    ``target_ce`` is the unweighted mean CE; with no valid position it is a zero still
    connected to ``features``. Both terms are float32 (float64 for float64 inputs) whatever
    the input dtype or autocast state. In ``eval()`` mode nothing is updated.

    Under DDP each rank sees its own batch, so the per-class sums of :math:`\hat f` and the
    counts are summed over the ranks with ``all_reduce`` before the centres move (every rank
    then holds the same centres), and the assignment computed from them is broadcast from
    rank 0, so that ``centers``, ``assignment`` and ``step`` agree on every rank. The update is
    a collective operation: every rank must call ``forward`` in training mode the same number
    of times, even on a batch with no valid position. The targets are drawn from ``seed``:
    pass the same ``seed`` on every rank (``None`` draws it from torch's global generator,
    which then must be seeded alike on every rank).

    Args:
        num_classes: number of classes ``C`` (>= 2).
        feat_dim: feature channels ``D`` (>= 2).
        weight: multiplier ``w`` of the CE term (>= 0).
        temperature: ``tau`` dividing the cosines (> 0).
        assign_every: training steps between two assignments (>= 1).
        momentum: EMA momentum ``m`` of the centres in ``[0, 1]``.
        ignore_index: label ignored in ``labels`` (``None``: every label is a class).
        seed: seed of the target configuration (``None``: drawn from torch's global
            generator).

    Shapes:
        ``features`` ``(N, D)`` with ``labels`` ``(N,)``, or ``(B, D, H, W)`` with ``labels``
        ``(B, H', W')``.

    Returns:
        ``{"loss": w * target_ce, "target_ce": target_ce}``, scalar tensors.
    """

    targets: torch.Tensor
    assignment: torch.Tensor
    centers: torch.Tensor
    initialized: torch.Tensor
    step: torch.Tensor

    def __init__(
        self,
        num_classes: int,
        feat_dim: int,
        *,
        weight: float = 1.0,
        temperature: float = 0.1,
        assign_every: int = 100,
        momentum: float = 0.9,
        ignore_index: int | None = 255,
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        self.feat_dim = check_positive_int(feat_dim, "feat_dim")
        if self.feat_dim < 2:
            raise ValueError(
                f"feat_dim must be >= 2 to spread targets on the unit sphere, got {feat_dim}"
            )
        self.weight = check_non_negative(weight, "weight")
        self.temperature = check_positive(temperature, "temperature")
        self.assign_every = check_positive_int(assign_every, "assign_every")
        self.momentum = check_probability(momentum, "momentum")
        self.ignore_index = check_ignore_index(ignore_index)
        seed = seed_or_draw(check_seed(seed))
        targets = riesz_uniform_points(self.num_classes, self.feat_dim, seed=seed)
        dtype = torch.get_default_dtype()
        self.register_buffer("targets", targets.to(dtype).contiguous())
        self.register_buffer("assignment", torch.arange(self.num_classes, dtype=torch.long))
        self.register_buffer("centers", torch.zeros(self.num_classes, self.feat_dim))
        self.register_buffer("initialized", torch.zeros(self.num_classes, dtype=torch.bool))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, feat_dim={self.feat_dim}, weight={self.weight}, "
            f"temperature={self.temperature}, assign_every={self.assign_every}, "
            f"momentum={self.momentum}, ignore_index={self.ignore_index}"
        )

    def reference_points(self) -> tuple[str, torch.Tensor]:
        """``("targets", T[assignment])``: a detached float32 CPU copy ``(C, D)`` of the
        targets ordered by class (row ``c`` is class ``c``'s current target)."""
        return "targets", self.targets[self.assignment].detach().float().cpu().clone()

    @torch.no_grad()
    def _update_centers(self, directions: torch.Tensor, labels: torch.Tensor) -> None:
        """EMA step of the centres from the unit ``directions`` ``(M, D)`` of the valid
        positions, with class ``labels`` ``(M,)``; class statistics all-reduced under DDP.

        Computed in float32 (float64 for float64 buffers), a dtype that depends on the
        buffers only, so every rank all-reduces alike."""
        dtype = loss_compute_dtype(self.centers.dtype)
        d = self.feat_dim
        stats = torch.zeros(self.num_classes, d + 1, dtype=dtype, device=self.centers.device)
        stats[:, :d].index_add_(0, labels, directions.detach().to(dtype))
        stats[:, d].index_add_(0, labels, torch.ones_like(labels, dtype=dtype))
        if is_distributed():
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        present = stats[:, d] > 0
        means = F.normalize(stats[:, :d], dim=1)  # the direction of sum = that of the mean
        previous = self.centers.to(dtype)
        blended = self.momentum * previous + (1.0 - self.momentum) * means
        updated = torch.where(self.initialized[:, None], blended, means)
        self.centers.copy_(torch.where(present[:, None], updated, previous))
        self.initialized |= present

    @torch.no_grad()
    def assign(self) -> torch.Tensor:
        """Recompute ``assignment`` from the current centres (Hungarian, maximal total cosine)
        and return it. Called by ``forward``; under DDP a collective (rank 0 broadcasts)."""
        from scipy.optimize import linear_sum_assignment  # scipy comes with scikit-learn

        centers = F.normalize(self.centers.detach().to("cpu", torch.float64), dim=1)
        cosine = centers @ self.targets.detach().to("cpu", torch.float64).T
        rows, cols = linear_sum_assignment(-cosine.numpy())
        assignment = torch.empty(self.num_classes, dtype=torch.long)
        assignment[torch.as_tensor(rows, dtype=torch.long)] = torch.as_tensor(
            cols, dtype=torch.long
        )
        self.assignment.copy_(assignment)
        if is_distributed():
            dist.broadcast(self.assignment, src=0)
        return self.assignment

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Update centres and assignment (training mode only) and return the target CE.

        Args:
            features: ``(N, D)`` or ``(B, D, H, W)``, floating point.
            labels: ``(N,)`` or ``(B, H', W')``, integer class indices or ``ignore_index``.
        """
        feats, classes, dtype = _rows(self, features, labels, self.targets)
        with autocast_off(features):
            directions = F.normalize(feats.to(dtype), dim=1)
            if self.training:
                self._update_centers(directions, classes)
                if int(self.step) % self.assign_every == 0:
                    self.assign()
                self.step += 1
            if classes.numel() == 0:
                target_ce = connected_zero(features).to(dtype)
            else:
                logits = directions @ self.targets.to(dtype).T / self.temperature
                target_ce = F.cross_entropy(logits, self.assignment[classes])
        return {"loss": self.weight * target_ce, "target_ce": target_ce}


def _etf_rows(num_classes: int, feat_dim: int, *, seed: int = 0) -> torch.Tensor:
    r"""``C`` unit rows in :math:`\mathbb{R}^D` with pairwise cosine exactly ``-1/(C-1)``:
    ``(C, D)`` float64.

    For ``D >= C`` the transpose of :func:`anchorlearn._geometry.simplex_etf` (the library's
    ETF for that seed). A simplex of ``C`` points spans only ``C - 1`` dimensions, so
    ``D = C - 1`` also works: the rows are then
    :math:`\sqrt{C/(C-1)}\, B R`, ``B`` ``(C, C-1)`` an orthonormal basis of the vectors
    orthogonal to :math:`\mathbf{1}` (so :math:`B B^\top = I - \mathbf{1}\mathbf{1}^\top / C`)
    and ``R`` a random rotation drawn from ``seed``. ``D < C - 1`` is impossible.
    """
    if feat_dim < num_classes - 1:
        raise ValueError(
            f"feat_dim must be >= num_classes - 1 for a simplex ETF (C points span C - 1 "
            f"dimensions), got feat_dim={feat_dim} and num_classes={num_classes}"
        )
    if feat_dim >= num_classes:
        return simplex_etf(feat_dim, num_classes, seed=seed).T.contiguous()
    generator = torch.Generator().manual_seed(seed)
    centring = torch.eye(num_classes, dtype=torch.float64) - 1.0 / num_classes
    basis, _ = torch.linalg.qr(centring[:, :feat_dim])
    gaussian = torch.randn(feat_dim, feat_dim, generator=generator, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(gaussian)
    return math.sqrt(num_classes / (num_classes - 1)) * basis @ rotation


class CenterCollapseLoss(nn.Module):
    r"""CeCo-style centre classification by a fixed simplex ETF (Zhong et al., CVPR 2023).

    Center collapse regularisation argues that in imbalanced segmentation the minor classes'
    feature centres fail to spread apart as neural collapse predicts, and asks the per-class
    centres of each batch, rather than every pixel, to be classified correctly by a
    classifier frozen at a simplex equiangular tight frame, the maximally separated
    configuration. Here, with no projection head (the paper trains one; this baseline
    regularises the given features directly):

    1. For each class ``c`` present among the valid positions of the batch, its centre
       :math:`\mu_c` = the mean of its features (not normalised first).
    2. Logits :math:`s\, \hat\mu_c E^\top` with :math:`\hat\mu_c = \mu_c / \lVert\mu_c\rVert`
       and ``E`` ``(C, D)`` the fixed ETF (unit rows, pairwise cosine ``-1/(C-1)``; buffer
       ``etf``, see :func:`_etf_rows`; needs ``D >= C - 1``).
    3. ``center_ce`` = the mean over the present classes of ``CE(logits_c, c)``;
       ``loss = weight * center_ce``.

    The gradient reaches only the features (through the centres); the ETF is a constant. With
    no valid position ``center_ce`` is a zero still connected to ``features``. Terms are
    float32 (float64 for float64 inputs) whatever the input dtype or autocast state. The
    module keeps no state that changes, so training and eval mode compute the same.

    Under DDP each rank's centres are the means of its own batch (no communication, as with
    any per-rank loss; DDP averages the gradients). The ETF is drawn from ``seed``: pass the
    same ``seed`` on every rank.

    Args:
        num_classes: number of classes ``C`` (>= 2).
        feat_dim: feature channels ``D`` (>= ``C - 1``).
        weight: multiplier of the centre CE (>= 0). Default 1.0: the paper's own setting
            was not verified here, so the neutral value is the default.
        scale: ``s`` multiplying the cosine logits (> 0).
        ignore_index: label ignored in ``labels`` (``None``: every label is a class).
        seed: seed of the ETF's random rotation (``None``: drawn from torch's global
            generator).

    Shapes:
        ``features`` ``(N, D)`` with ``labels`` ``(N,)``, or ``(B, D, H, W)`` with ``labels``
        ``(B, H', W')``.

    Returns:
        ``{"loss": weight * center_ce, "center_ce": center_ce}``, scalar tensors.
    """

    etf: torch.Tensor

    def __init__(
        self,
        num_classes: int,
        feat_dim: int,
        *,
        weight: float = 1.0,
        scale: float = 10.0,
        ignore_index: int | None = 255,
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        self.feat_dim = check_positive_int(feat_dim, "feat_dim")
        self.weight = check_non_negative(weight, "weight")
        self.scale = check_positive(scale, "scale")
        self.ignore_index = check_ignore_index(ignore_index)
        seed = seed_or_draw(check_seed(seed))
        etf = _etf_rows(self.num_classes, self.feat_dim, seed=seed)
        self.register_buffer("etf", etf.to(torch.get_default_dtype()).contiguous())

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, feat_dim={self.feat_dim}, weight={self.weight}, "
            f"scale={self.scale}, ignore_index={self.ignore_index}"
        )

    def reference_points(self) -> tuple[str, torch.Tensor]:
        """``("etf", E)``: a detached float32 CPU copy ``(C, D)`` of the ETF vectors."""
        return "etf", self.etf.detach().float().cpu().clone()

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return the centre CE of the batch.

        Args:
            features: ``(N, D)`` or ``(B, D, H, W)``, floating point.
            labels: ``(N,)`` or ``(B, H', W')``, integer class indices or ``ignore_index``.
        """
        feats, classes, dtype = _rows(self, features, labels, self.etf)
        if classes.numel() == 0:
            center_ce = connected_zero(features).to(dtype)
            return {"loss": self.weight * center_ce, "center_ce": center_ce}
        with autocast_off(features):
            sums = feats.new_zeros(self.num_classes, self.feat_dim, dtype=dtype).index_add(
                0, classes, feats.to(dtype)
            )
            counts = torch.bincount(classes, minlength=self.num_classes)
            present = torch.nonzero(counts).flatten()
            centres = sums[present] / counts[present, None].to(dtype)
            logits = self.scale * F.normalize(centres, dim=1) @ self.etf.to(dtype).T
            center_ce = F.cross_entropy(logits, present)
        return {"loss": self.weight * center_ce, "center_ce": center_ce}
