"""PAUC: ProtoNCE revised by alignment, uniformity and correlation terms.

Mo, Sun and Li, "Rethinking Prototypical Contrastive Learning through Alignment, Uniformity
and Correlation" (BMVC 2022) publish no code and no formulas beyond their abstract: ProtoNCE
optimised alone *coagulates* (the samples of a prototype collapse together) and is revised
with an alignment, a uniformity and a correlation loss. Every formula in this module is
therefore **our formulation**, built from established losses, with the alternatives kept
selectable so that they can be measured:

- :class:`AlignmentLoss`: Wang & Isola (2020) alignment between each embedding and its
  positive prototype (optionally also between the two views).
- :class:`UniformityLoss`: Wang & Isola uniformity over differentiable prototype-level
  features, either batch means of the embeddings grouped by cluster or per-sample
  prototype-assignment vectors.
- :class:`CorrelationLoss`: Barlow Twins cross-correlation of the two views'
  prototype-level features, or the VICReg covariance penalty.
- :class:`PAUCLoss`: ProtoNCE plus the three, each weighted and switchable to zero.

k-means prototypes carry no gradient, which is why the uniformity and correlation terms work
on prototype-level features computed from the embeddings of the batch.

Every term is computed with autocast off in float32 (float64 for float64 inputs) and
returned in that dtype: half-precision embeddings and features are upcast first.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
from torch import nn

from anchorlearn._checks import (
    autocast_off,
    check_l2_normalised,
    check_matrix,
    check_non_negative,
    check_positive,
    check_positive_int,
    connected_zero,
    loss_compute_dtype,
)
from anchorlearn.losses.contrastive import ProtoNCE, check_prototype_inputs

__all__ = [
    "ALIGNMENT_MODES",
    "CORRELATION_MODES",
    "UNIFORMITY_MODES",
    "AlignmentLoss",
    "CorrelationLoss",
    "PAUCLoss",
    "PAUCParameters",
    "UniformityLoss",
    "cluster_batch_means",
    "prototype_assignments",
]

UniformityMode = Literal["batch_means", "assignment"]
CorrelationMode = Literal["barlow", "vicreg"]
UNIFORMITY_MODES: tuple[str, ...] = ("batch_means", "assignment")
ALIGNMENT_MODES: tuple[str, ...] = ("prototype", "views", "pairs")
CORRELATION_MODES: tuple[str, ...] = ("barlow", "vicreg")


def _check_choice(value: object, name: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return str(value)


def _zero(like: torch.Tensor) -> torch.Tensor:
    """A scalar zero attached to the graph of ``like`` (keeps DDP's used-parameter set stable),
    in float32 or wider; it cannot overflow (:func:`connected_zero`)."""
    return connected_zero(like)


_OptionalTensor = TypeVar("_OptionalTensor", torch.Tensor, None)


def _upcast(x: _OptionalTensor) -> _OptionalTensor:
    """``x`` in the dtype the losses compute in: float32, or float64 for float64 inputs."""
    return None if x is None else x.to(loss_compute_dtype(x.dtype))


def _check_second_view(k: torch.Tensor | None, q: torch.Tensor, name: str = "k") -> None:
    if k is None:
        return
    check_matrix(k, name, cols=q.shape[1])
    if k.shape != q.shape:
        raise ValueError(
            f"{name} must have shape {tuple(q.shape)} to match q, got {tuple(k.shape)}"
        )
    check_l2_normalised(k, name)


def cluster_batch_means(
    x: torch.Tensor, assignments: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""L2-normalised means of the rows of ``x`` grouped by cluster.

    .. math:: z_c = \frac{\bar x_c}{\lVert \bar x_c \rVert},\qquad
              \bar x_c = \frac{1}{|B_c|}\sum_{i \in B_c} x_i

    Clusters without a member in the batch are skipped.

    Shapes:
        ``x``: ``(N, D)``; ``assignments``: ``(N,)`` integer. Returns the means ``(m, D)``
        and the cluster ids ``(m,)`` (sorted ascending, so two views with the same
        assignments give row-aligned means), ``m`` the number of distinct clusters present.
    """
    ids, inverse = torch.unique(assignments, sorted=True, return_inverse=True)
    sums = x.new_zeros(ids.shape[0], x.shape[1]).index_add(0, inverse, x)
    counts = torch.bincount(inverse, minlength=ids.shape[0]).to(x.dtype)
    return torch.nn.functional.normalize(sums / counts[:, None], dim=1), ids


def prototype_assignments(
    x: torch.Tensor, prototypes: torch.Tensor, concentrations: torch.Tensor
) -> torch.Tensor:
    r"""Soft prototype-assignment vectors :math:`p_i = \mathrm{softmax}_j(x_i\cdot c_j/\phi_j)`.

    Shapes:
        ``x``: ``(N, D)``; ``prototypes``: ``(k, D)``; ``concentrations``: ``(k,)``.
        Returns ``(N, k)``, rows summing to 1.
    """
    logits = (x @ prototypes.to(x.dtype).t()) / concentrations.to(x.dtype)
    return torch.softmax(logits, dim=1)


def _uniformity(z: torch.Tensor, t: float) -> torch.Tensor | None:
    r""":math:`\log \frac{1}{m(m-1)}\sum_{j \ne l} e^{-t\lVert z_j - z_l\rVert^2}`, or ``None``
    when ``z`` has fewer than two rows (no pair)."""
    m = z.shape[0]
    if m < 2:
        return None
    sq_norms = (z * z).sum(dim=1)
    sq_dists = (sq_norms[:, None] + sq_norms[None, :] - 2.0 * (z @ z.t())).clamp_min(0.0)
    rows, cols = torch.triu_indices(m, m, offset=1, device=z.device)
    pair_terms = -t * sq_dists[rows, cols]
    return torch.logsumexp(pair_terms, dim=0) - math.log(pair_terms.numel())


def _standardise(z: torch.Tensor, eps: float) -> torch.Tensor:
    """Columns to zero mean and unit biased variance over the rows (BatchNorm, no affine)."""
    centred = z - z.mean(dim=0, keepdim=True)
    return centred / torch.sqrt(centred.pow(2).mean(dim=0, keepdim=True) + eps)


def _off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    """The off-diagonal entries of a square ``(P, P)`` matrix, flattened."""
    p = matrix.shape[0]
    return matrix.flatten()[:-1].view(p - 1, p + 1)[:, 1:].flatten()


class AlignmentLoss(nn.Module):
    r"""Alignment of embeddings with their positive prototypes (our formulation for PAUC).

    .. math::
        \mathcal{L}_{align} = \frac{1}{G}\sum_g \frac{1}{N}\sum_i
            \lVert q_i - c^{g}_{a^g_i} \rVert_2^{\alpha}
            \;+\; w_{view}\,\frac{1}{N}\sum_i \lVert q_i - k_i \rVert_2^{\alpha}

    The first part (``mode="prototype"``, the default) is Wang & Isola's (2020) alignment
    with the positive prototype in place of the positive sample: it pulls each embedding
    towards its cluster instead of only pushing it away from the others, as ProtoNCE does.
    The optional second part is their original view-to-view alignment. Alternatives not
    chosen: the cosine form :math:`1 - q\cdot c` (equal to half the :math:`\alpha = 2`
    form on the sphere) and a concentration-weighted distance :math:`\lVert q - c\rVert^2/\phi`.

    Pulling every sample to its prototype tightens the clusters (it raises coagulation).
    Two other readings replace the first part, both needing the other view ``k``:

    - ``mode="views"``: only Wang & Isola's view-to-view term,
      :math:`\frac{1}{N}\sum_i \lVert q_i - k_i \rVert^{\alpha}` (``view_weight`` must
      stay 0: this mode is that term);
    - ``mode="pairs"``: alignment between samples that share a prototype,
      :math:`\frac{1}{G}\sum_g \frac{1}{N}\sum_i \frac{1}{|S^g_i|}\sum_{j \in S^g_i}
      \lVert q_i - k_j \rVert^{\alpha}` with :math:`S^g_i = \{j : a^g_j = a^g_i\}` (which
      holds :math:`i`, so each sample's own other view is one of its positives).

    Args:
        alpha: :math:`\alpha > 0` (Wang & Isola: 2).
        view_weight: :math:`w_{view} \ge 0`; 0 disables the view term (reported as 0).
        mode: one of :data:`ALIGNMENT_MODES`.

    Shapes:
        ``q``: ``(N, D)`` L2-normalised; ``assignments[g]``: ``(N,)`` integer;
        ``prototypes[g]``: ``(k_g, D)`` L2-normalised; ``k``: ``(N, D)`` L2-normalised, the
        other view, required when ``view_weight > 0``. Returns ``{"loss", "alignment",
        "view_alignment"}``: the weighted total, the prototype part and the view part.
    """

    def __init__(
        self, alpha: float = 2.0, view_weight: float = 0.0, mode: str = "prototype"
    ) -> None:
        super().__init__()
        self.alpha = check_positive(alpha, "alpha")
        self.view_weight = check_non_negative(view_weight, "view_weight")
        self.mode = _check_choice(mode, "mode", ALIGNMENT_MODES)
        if self.mode == "views" and self.view_weight > 0:
            raise ValueError(
                f"view_weight={view_weight} adds the view term to the prototype term; "
                "mode='views' is that term alone: set view_weight to 0"
            )

    @property
    def needs_second_view(self) -> bool:
        """Whether :meth:`forward` needs ``k``."""
        return self.view_weight > 0 or self.mode != "prototype"

    def _distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        sq = (a - b).pow(2).sum(dim=1)
        if self.alpha == 2.0:
            return sq
        # clamp: the gradient of a fractional power is unbounded at distance 0
        return sq.clamp_min(1e-12).pow(self.alpha / 2.0)

    def forward(
        self,
        q: torch.Tensor,
        assignments: Sequence[torch.Tensor],
        prototypes: Sequence[torch.Tensor],
        k: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        q = check_matrix(q, "q")
        check_l2_normalised(q, "q")
        check_prototype_inputs(q, assignments, prototypes)
        for g, protos in enumerate(prototypes):
            check_l2_normalised(protos, f"prototypes[{g}]")
        _check_second_view(k, q)
        if self.needs_second_view and k is None:
            why = "view_weight > 0" if self.mode == "prototype" else f"mode={self.mode!r}"
            raise ValueError(f"k (the second view, (N, D)) is required with {why}")
        with autocast_off(q):
            return self._terms(_upcast(q), assignments, prototypes, _upcast(k))

    def _terms(
        self,
        q: torch.Tensor,
        assignments: Sequence[torch.Tensor],
        prototypes: Sequence[torch.Tensor],
        k: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        if q.shape[0] == 0:
            zero = _zero(q)
            return {"loss": zero, "alignment": zero, "view_alignment": zero}
        if self.mode == "views":
            view_alignment = self._distance(q, k.to(q.dtype)).mean()
            return {"loss": view_alignment, "alignment": _zero(q), "view_alignment": view_alignment}
        if self.mode == "pairs":
            alignment = torch.stack(
                [self._shared_prototype_pairs(q, k.to(q.dtype), a.long()) for a in assignments]
            ).mean()
        else:
            alignment = torch.stack(
                [
                    self._distance(q, protos.to(q.dtype)[labels.long()]).mean()
                    for labels, protos in zip(assignments, prototypes, strict=True)
                ]
            ).mean()
        if self.view_weight > 0 and k is not None:
            view_alignment = self._distance(q, k.to(q.dtype)).mean()
        else:
            view_alignment = _zero(q)
        loss = alignment + self.view_weight * view_alignment
        return {"loss": loss, "alignment": alignment, "view_alignment": view_alignment}

    def _shared_prototype_pairs(
        self, q: torch.Tensor, k: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """Mean over ``i`` of the mean distance from ``q_i`` to the ``k_j`` of its cluster."""
        sq = _pairwise_sq(q, k)
        dist = sq if self.alpha == 2.0 else sq.clamp_min(1e-12).pow(self.alpha / 2.0)
        same = (labels[:, None] == labels[None, :]).to(q.dtype)
        return ((dist * same).sum(dim=1) / same.sum(dim=1)).mean()


def _pairwise_sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``(N, M)`` between rows, exact on the unit sphere up to
    rounding and never negative."""
    return (a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None, :] - 2.0 * a @ b.T).clamp_min(0.0)


class UniformityLoss(nn.Module):
    r"""Uniformity of prototype-level features (our formulation for PAUC).

    .. math::
        \mathcal{L}_{unif} = \frac{1}{G}\sum_g \log \frac{1}{m(m-1)}
            \sum_{j \ne l} e^{-t \lVert z^g_j - z^g_l \rVert_2^2}

    Wang & Isola's (2020) uniformity, applied to differentiable prototype-level features
    :math:`z^g` of granularity :math:`g` (k-means prototypes carry no gradient):

    - ``mode="batch_means"`` (default): :math:`z^g_c` are the L2-normalised means of the
      batch's embeddings grouped by their cluster (:func:`cluster_batch_means`); clusters
      with no member in the batch are skipped, :math:`m` is the number present. Spreads the
      clusters' centres of mass over the sphere.
    - ``mode="assignment"``: :math:`z^g_i = \mathrm{softmax}_j(q_i\cdot c_j/\phi_j)`, the
      per-sample assignment vectors (:func:`prototype_assignments`), :math:`m = N`. Pushes
      samples towards confident assignments to distinct prototypes.

    A granularity with fewer than two features has no pair and is left out of the mean; if
    none has a pair the term is 0. Alternative not chosen: uniformity of the k-means
    centroids themselves, which carries no gradient to the encoder.

    Args:
        t: :math:`t > 0` (Wang & Isola: 2).
        mode: ``"batch_means"`` or ``"assignment"``.
        temperature: the concentration of every prototype in ``"assignment"`` mode when
            ``concentrations`` is not given.

    Shapes:
        ``q``: ``(N, D)`` L2-normalised; ``assignments[g]``: ``(N,)`` integer;
        ``prototypes[g]``: ``(k_g, D)`` and ``concentrations[g]``: ``(k_g,)`` (both used in
        ``"assignment"`` mode only; ``prototypes`` required there). Returns
        ``{"loss", "uniformity"}``, scalars (equal).
    """

    def __init__(
        self, t: float = 2.0, mode: UniformityMode = "batch_means", temperature: float = 0.2
    ) -> None:
        super().__init__()
        self.t = check_positive(t, "t")
        self.mode = _check_choice(mode, "mode", UNIFORMITY_MODES)
        self.temperature = check_positive(temperature, "temperature")

    def forward(
        self,
        q: torch.Tensor,
        assignments: Sequence[torch.Tensor],
        prototypes: Sequence[torch.Tensor] | None = None,
        concentrations: Sequence[torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        q = check_matrix(q, "q")
        check_l2_normalised(q, "q")
        if prototypes is None and self.mode == "assignment":
            raise ValueError("prototypes are required when mode='assignment', got None")
        check_prototype_inputs(q, assignments, prototypes, concentrations)
        with autocast_off(q):
            loss = self._loss(_upcast(q), assignments, prototypes, concentrations)
        return {"loss": loss, "uniformity": loss}

    def _loss(
        self,
        q: torch.Tensor,
        assignments: Sequence[torch.Tensor],
        prototypes: Sequence[torch.Tensor] | None,
        concentrations: Sequence[torch.Tensor] | None,
    ) -> torch.Tensor:
        terms = []
        for g, labels in enumerate(assignments):
            if self.mode == "batch_means":
                features, _ = cluster_batch_means(q, labels.long())
            else:
                assert prototypes is not None
                phi = (
                    concentrations[g]
                    if concentrations is not None
                    else q.new_full((prototypes[g].shape[0],), self.temperature)
                )
                features = prototype_assignments(q, prototypes[g], phi)
            term = _uniformity(features, self.t)
            if term is not None:
                terms.append(term)
        return torch.stack(terms).mean() if terms else _zero(q)


class CorrelationLoss(nn.Module):
    r"""Correlation of paired prototype-level features of two views (our formulation for PAUC).

    ``mode="barlow"`` (default; Barlow Twins, Zbontar et al. 2021): with :math:`\hat z^1,
    \hat z^2` the features standardised per column over the :math:`M` rows (zero mean, unit
    biased variance, ``eps`` added to the variance) and
    :math:`C = \frac{1}{M}\hat z^{1\top}\hat z^2` their :math:`P \times P` cross-correlation,

    .. math::
        \mathcal{L}_{corr} = \frac{1}{P}\Big[\sum_i (1 - C_{ii})^2
            + \lambda \sum_{i \ne j} C_{ij}^2\Big]

    Diagonal to 1 makes each prototype-level feature agree across views; off-diagonal to 0
    decorrelates different features (diversity and discriminability between prototypes).
    The division by :math:`P` (Barlow Twins sums) keeps the scale independent of the number
    of prototypes.

    ``mode="vicreg"`` (VICReg covariance penalty, Bardes et al. 2022): for each view,
    :math:`\mathrm{Cov}(z) = \frac{1}{M-1}\sum_r (z_r - \bar z)(z_r - \bar z)^\top` and

    .. math::
        c(z) = \frac{1}{P}\sum_{i \ne j} \mathrm{Cov}(z)_{ij}^2,\qquad
        \mathcal{L}_{corr} = \tfrac{1}{2}\big(c(z^1) + c(z^2)\big)

    (just :math:`c(z^1)` without a second view). VICReg's variance and invariance terms are
    left out: uniformity and alignment play those roles in PAUC. With fewer than two rows
    there is no statistic and the term is 0.

    Args:
        mode: ``"barlow"`` or ``"vicreg"``.
        lambda_offdiag: :math:`\lambda \ge 0` for ``"barlow"`` (Barlow Twins: 5e-3).
        eps: added to the variance before standardising (BatchNorm's 1e-5).

    Shapes:
        ``z1``, ``z2``: ``(M, P)``, row ``r`` of both describing the same thing (sample or
        cluster) in the two views; ``z2`` required in ``"barlow"`` mode.
        Returns ``{"loss", "correlation"}``, scalars (equal).
    """

    def __init__(
        self, mode: CorrelationMode = "barlow", lambda_offdiag: float = 5e-3, eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.mode = _check_choice(mode, "mode", CORRELATION_MODES)
        self.lambda_offdiag = check_non_negative(lambda_offdiag, "lambda_offdiag")
        self.eps = check_positive(eps, "eps")

    def forward(self, z1: torch.Tensor, z2: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        z1 = check_matrix(z1, "z1")
        if z2 is not None:
            z2 = check_matrix(z2, "z2", cols=z1.shape[1])
            if z2.shape != z1.shape:
                raise ValueError(
                    f"z2 must have shape {tuple(z1.shape)} to match z1, got {tuple(z2.shape)}"
                )
        elif self.mode == "barlow":
            raise ValueError("z2 (the second view's features, (M, P)) is required for 'barlow'")
        with autocast_off(z1):
            loss = self._loss(_upcast(z1), _upcast(z2))
        return {"loss": loss, "correlation": loss}

    def _loss(self, z1: torch.Tensor, z2: torch.Tensor | None) -> torch.Tensor:
        rows, p = z1.shape
        if rows < 2 or p == 0:
            return _zero(z1) if z2 is None else _zero(z1) + _zero(z2)
        if self.mode == "barlow":
            assert z2 is not None
            corr = _standardise(z1, self.eps).t() @ _standardise(z2.to(z1.dtype), self.eps) / rows
            on_diag = (1.0 - torch.diagonal(corr)).pow(2).sum()
            off_diag = _off_diagonal(corr).pow(2).sum() if p > 1 else corr.new_zeros(())
            return (on_diag + self.lambda_offdiag * off_diag) / p
        views = [z1] if z2 is None else [z1, z2.to(z1.dtype)]
        penalties = []
        for z in views:
            centred = z - z.mean(dim=0, keepdim=True)
            cov = centred.t() @ centred / (rows - 1)
            off = _off_diagonal(cov) if p > 1 else cov.new_zeros(0)
            penalties.append(off.pow(2).sum() / p)
        return torch.stack(penalties).mean()


@dataclass
class PAUCParameters:
    """The parameters of :class:`PAUCLoss` other than the temperature, with their defaults.

    The one list of them: :class:`PAUCLoss` takes its defaults from here,
    :meth:`PAUCLoss.from_params` builds the loss from an instance (or a mapping), and a
    pretraining config's loss section extends this class with its own settings.

    Attributes:
        protonce_weight: :math:`w_p`, the weight of ProtoNCE.
        align_weight: :math:`w_a`, the weight of :class:`AlignmentLoss`.
        uniform_weight: :math:`w_u`, the weight of :class:`UniformityLoss`.
        corr_weight: :math:`w_c`, the weight of :class:`CorrelationLoss`.
        num_negatives: negative prototypes sampled per granularity by ProtoNCE.
        align_alpha: :class:`AlignmentLoss`'s ``alpha``.
        align_view_weight: :class:`AlignmentLoss`'s ``view_weight``.
        align_mode: :class:`AlignmentLoss`'s ``mode``, one of :data:`ALIGNMENT_MODES`.
        uniform_t: :class:`UniformityLoss`'s ``t``.
        uniform_mode: :class:`UniformityLoss`'s ``mode``, one of :data:`UNIFORMITY_MODES`.
        corr_mode: :class:`CorrelationLoss`'s ``mode``, one of :data:`CORRELATION_MODES`.
        corr_lambda: :class:`CorrelationLoss`'s ``lambda_offdiag``.
        corr_features: the prototype-level features of the correlation term, one of
            :data:`UNIFORMITY_MODES`.
    """

    protonce_weight: float = 1.0
    align_weight: float = 1.0
    uniform_weight: float = 1.0
    corr_weight: float = 1.0
    num_negatives: int = 16000
    align_alpha: float = 2.0
    align_view_weight: float = 0.0
    align_mode: str = "prototype"
    uniform_t: float = 2.0
    uniform_mode: str = "batch_means"
    corr_mode: str = "barlow"
    corr_lambda: float = 5e-3
    corr_features: str = "assignment"


_DEFAULTS = PAUCParameters()


class PAUCLoss(nn.Module):
    r"""ProtoNCE revised with alignment, uniformity and correlation (our formulation of PAUC).

    .. math::
        \mathcal{L} = w_{p}\,\mathcal{L}_{ProtoNCE} + w_{a}\,\mathcal{L}_{align}
            + w_{u}\,\mathcal{L}_{unif} + w_{c}\,\mathcal{L}_{corr}

    with :class:`~anchorlearn.losses.contrastive.ProtoNCE`, :class:`AlignmentLoss`,
    :class:`UniformityLoss` and :class:`CorrelationLoss`. The correlation term is averaged
    over granularities and works on the two views' prototype-level features, chosen by
    ``corr_features``:

    - ``"assignment"`` (default): :math:`\mathrm{softmax}(q C^\top/\phi)` and
      :math:`\mathrm{softmax}(k C^\top/\phi)`, ``(N, k_g)``, rows paired by sample;
    - ``"batch_means"``: the normalised cluster means of ``q`` and of ``k`` grouped by the
      same assignments, ``(m, D)``, rows paired by cluster.

    The InfoNCE term of PCL is not included (add :class:`~anchorlearn.losses.contrastive.
    InfoNCE` to it). A zero weight skips the computation and reports the term as 0. The
    default weights are starting points, not tuned values (the paper's are not public).

    Args:
        temperature: ProtoNCE's concentration where none is given, and the temperature of
            the assignment features. The other arguments are the fields of
            :class:`PAUCParameters`, documented and defaulted there; :meth:`from_params`
            builds the loss from one.

    Shapes:
        ``q``: ``(N, D)`` L2-normalised query embeddings (with gradient); ``k``: ``(N, D)``
        L2-normalised embeddings of the other view (e.g. MoCo's keys), required when
        ``corr_weight > 0`` in ``"barlow"`` mode, ``align_view_weight > 0`` or
        ``align_mode`` other than ``"prototype"``; the E-step
        result per granularity as for ProtoNCE. Returns ``{"loss", "protonce",
        "alignment", "uniformity", "correlation"}``, scalars, each term without its PAUC
        weight (``alignment`` is AlignmentLoss's total: the prototype part plus
        ``align_view_weight`` times the view part).
    """

    def __init__(
        self,
        temperature: float = 0.2,
        num_negatives: int = _DEFAULTS.num_negatives,
        protonce_weight: float = _DEFAULTS.protonce_weight,
        align_weight: float = _DEFAULTS.align_weight,
        uniform_weight: float = _DEFAULTS.uniform_weight,
        corr_weight: float = _DEFAULTS.corr_weight,
        *,
        align_alpha: float = _DEFAULTS.align_alpha,
        align_view_weight: float = _DEFAULTS.align_view_weight,
        align_mode: str = _DEFAULTS.align_mode,
        uniform_t: float = _DEFAULTS.uniform_t,
        uniform_mode: UniformityMode = _DEFAULTS.uniform_mode,
        corr_mode: CorrelationMode = _DEFAULTS.corr_mode,
        corr_lambda: float = _DEFAULTS.corr_lambda,
        corr_features: UniformityMode = _DEFAULTS.corr_features,
    ) -> None:
        super().__init__()
        self.protonce = ProtoNCE(temperature, check_positive_int(num_negatives, "num_negatives"))
        self.alignment = AlignmentLoss(align_alpha, align_view_weight, align_mode)
        self.uniformity = UniformityLoss(uniform_t, uniform_mode, temperature)
        self.correlation = CorrelationLoss(corr_mode, corr_lambda)
        self.corr_features = _check_choice(corr_features, "corr_features", UNIFORMITY_MODES)
        self.weights = {
            "protonce": check_non_negative(protonce_weight, "protonce_weight"),
            "alignment": check_non_negative(align_weight, "align_weight"),
            "uniformity": check_non_negative(uniform_weight, "uniform_weight"),
            "correlation": check_non_negative(corr_weight, "corr_weight"),
        }

    @classmethod
    def from_params(
        cls, params: PAUCParameters | Mapping[str, Any], *, temperature: float = 0.2
    ) -> PAUCLoss:
        """The loss with ``temperature`` and the parameters in ``params``.

        ``params``: a :class:`PAUCParameters` (or an instance of a class extending it, such
        as a pretraining config's loss section: only the PAUC fields are read), or a mapping
        of some of its field names to values (the others keep their defaults; any other
        name is a ``ValueError`` naming it and the allowed ones).
        """
        names = [f.name for f in dataclasses.fields(PAUCParameters)]
        if isinstance(params, PAUCParameters):
            values = {name: getattr(params, name) for name in names}
        elif isinstance(params, Mapping):
            unknown = [key for key in params if key not in names]
            if unknown:
                raise ValueError(
                    f"unknown PAUCLoss parameter {unknown[0]!r}; allowed: {', '.join(names)}"
                )
            values = dict(params)
        else:
            raise TypeError(
                f"params must be a PAUCParameters or a mapping, got {type(params).__name__}"
            )
        return cls(temperature, **values)

    def _correlation(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None,
        assignments: Sequence[torch.Tensor],
        prototypes: Sequence[torch.Tensor],
        concentrations: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        terms = []
        for labels, protos, phi in zip(assignments, prototypes, concentrations, strict=True):
            if self.corr_features == "assignment":
                z1 = prototype_assignments(q, protos, phi)
                z2 = None if k is None else prototype_assignments(k, protos, phi)
            else:
                z1, _ = cluster_batch_means(q, labels.long())
                z2 = None if k is None else cluster_batch_means(k, labels.long())[0]
            terms.append(self.correlation._loss(z1, z2))
        return torch.stack(terms).mean()

    def forward(
        self,
        q: torch.Tensor,
        assignments: Sequence[torch.Tensor],
        prototypes: Sequence[torch.Tensor],
        concentrations: Sequence[torch.Tensor] | None = None,
        k: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        q = check_matrix(q, "q")
        check_l2_normalised(q, "q")
        check_prototype_inputs(q, assignments, prototypes, concentrations)
        _check_second_view(k, q)
        if q.shape[0] == 0:  # an empty batch: every term zero, attached to the graph
            zero = _zero(q)
            return {"loss": zero, **dict.fromkeys(self.weights, zero)}
        if k is None and self.weights["correlation"] > 0 and self.correlation.mode == "barlow":
            raise ValueError("k (the second view, (N, D)) is required when corr_weight > 0")
        if k is None and self.weights["alignment"] > 0 and self.alignment.needs_second_view:
            raise ValueError(
                "k (the second view, (N, D)) is required when align_view_weight > 0 or "
                f"align_mode={self.alignment.mode!r}"
            )
        if self.weights["alignment"] > 0:
            for g, protos in enumerate(prototypes):
                check_l2_normalised(protos, f"prototypes[{g}]")
        if concentrations is None:
            concentrations = [
                p.new_full((p.shape[0],), self.protonce.temperature) for p in prototypes
            ]
        with autocast_off(q):
            q, k = _upcast(q), _upcast(k)
            zero = _zero(q)
            terms = dict.fromkeys(self.weights, zero)
            if self.weights["protonce"] > 0:
                terms["protonce"] = self.protonce._loss(
                    q, assignments, prototypes, concentrations, generator
                )
            if self.weights["alignment"] > 0:
                terms["alignment"] = self.alignment._terms(q, assignments, prototypes, k)["loss"]
            if self.weights["uniformity"] > 0:
                terms["uniformity"] = self.uniformity._loss(
                    q, assignments, prototypes, concentrations
                )
            if self.weights["correlation"] > 0:
                terms["correlation"] = self._correlation(
                    q, k, assignments, prototypes, concentrations
                )
            loss = sum((self.weights[name] * value for name, value in terms.items()), zero)
        return {"loss": loss, **terms}
