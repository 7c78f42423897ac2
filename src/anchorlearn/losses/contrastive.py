"""Instance- and prototype-level contrastive losses: InfoNCE (MoCo) and ProtoNCE (PCL).

Both losses work on L2-normalised embeddings and check it: a row norm further than ``1e-3``
from one raises ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from anchorlearn._checks import (
    autocast_off,
    check_finite,
    check_l2_normalised,
    check_labels_tensor,
    check_matrix,
    check_positive,
    check_positive_int,
    connected_zero,
    loss_compute_dtype,
)

__all__ = ["InfoNCE", "ProtoNCE", "check_prototype_inputs"]


class InfoNCE(nn.Module):
    r"""InfoNCE over a key queue or over the other keys of the batch (MoCo, Oord et al. 2018).

    With a queue of negatives :math:`\{n_j\}_{j=1}^{K}`:

    .. math::
        \mathcal{L} = -\frac{1}{N}\sum_i \log
        \frac{\exp(q_i\cdot k_i/\tau)}{\exp(q_i\cdot k_i/\tau) + \sum_j \exp(q_i\cdot n_j/\tau)}

    Without a queue the negatives of :math:`q_i` are the other keys of the batch,
    :math:`\{k_l\}_{l \ne i}` (the positive sits on the diagonal of :math:`q k^\top`); a batch
    of one sample then has no negative and gives a zero loss.

    Args:
        temperature: :math:`\tau > 0` (MoCo v2 and PCL: 0.2).

    Shapes:
        ``q``, ``k``: ``(N, D)``, L2-normalised rows; ``queue``: ``(K, D)``, L2-normalised.
        Returns ``{"loss", "infonce"}``, both scalars (equal: the loss has one term).
    """

    def __init__(self, temperature: float = 0.2) -> None:
        super().__init__()
        self.temperature = check_positive(temperature, "temperature")

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        q = check_matrix(q, "q")
        k = check_matrix(k, "k", cols=q.shape[1])
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"k must have shape {tuple(q.shape)} to match q, got {tuple(k.shape)}")
        check_l2_normalised(q, "q")
        check_l2_normalised(k, "k")
        if q.shape[0] == 0:  # an empty batch: zero, attached to the graph
            zero = connected_zero(q, k)
            return {"loss": zero, "infonce": zero}
        if queue is not None:
            queue = check_matrix(queue, "queue", cols=q.shape[1])
            check_l2_normalised(queue, "queue")
        dtype = loss_compute_dtype(q.dtype, k.dtype)
        with autocast_off(q):
            q, k = q.to(dtype), k.to(dtype)
            if queue is None:
                logits = q @ k.t()
                target = torch.arange(q.shape[0], device=q.device)
            else:
                positives = (q * k).sum(dim=1, keepdim=True)
                logits = torch.cat([positives, q @ queue.to(dtype).t()], dim=1)
                target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
            loss = F.cross_entropy(logits / self.temperature, target)
        return {"loss": loss, "infonce": loss}


def check_prototype_inputs(
    q: torch.Tensor,
    assignments: Sequence[torch.Tensor],
    prototypes: Sequence[torch.Tensor] | None,
    concentrations: Sequence[torch.Tensor] | None = None,
) -> None:
    """Validate one E-step result per granularity against the embeddings ``q`` ``(N, D)``.

    ``assignments[g]`` is an integer ``(N,)`` tensor in ``[0, k_g)``, ``prototypes[g]`` a
    finite ``(k_g, D)`` float tensor with L2-normalised rows (as
    :func:`~anchorlearn.cluster.kmeans` returns them) and, when given, ``concentrations[g]``
    a finite ``(k_g,)`` float tensor of at least ``finfo(q.dtype).max ** -0.5`` (about
    5e-20 in float32, 4e-3 in float16): a logit ``q . c / phi`` and its gradient with
    respect to ``q`` (computed in float32, returned in ``q``'s dtype) then stay below the
    square root of the largest value of ``q``'s dtype, so neither they nor a sum of as many
    such terms overflows. Without ``prototypes`` the assignments are only checked to be
    non-negative.
    """
    lists = {"assignments": assignments}
    if prototypes is not None:
        lists["prototypes"] = prototypes
    if concentrations is not None:
        lists["concentrations"] = concentrations
    for name, seq in lists.items():
        if isinstance(seq, torch.Tensor) or not isinstance(seq, Sequence):
            raise TypeError(
                f"{name} must be a list of tensors (one per granularity), got {type(seq).__name__}"
            )
    if len(assignments) == 0:
        raise ValueError("assignments must hold at least one granularity, got an empty list")
    lengths = {name: len(seq) for name, seq in lists.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"one tensor per granularity expected in each list, got lengths {lengths}")
    n, d = q.shape
    for g in range(len(assignments)):
        labels = check_labels_tensor(assignments[g], f"assignments[{g}]")
        if labels.shape != (n,):
            raise ValueError(
                f"assignments[{g}] must have shape ({n},) to match q, got {tuple(labels.shape)}"
            )
        if prototypes is None:
            if n > 0 and int(labels.min()) < 0:
                raise ValueError(f"assignments[{g}] must be >= 0, got minimum {int(labels.min())}")
            continue
        protos = check_matrix(prototypes[g], f"prototypes[{g}]", cols=d)
        check_l2_normalised(protos, f"prototypes[{g}]")
        num_protos = protos.shape[0]
        if num_protos == 0:
            raise ValueError(f"prototypes[{g}] must hold at least one prototype, got 0 rows")
        if n > 0 and (int(labels.min()) < 0 or int(labels.max()) >= num_protos):
            raise ValueError(
                f"assignments[{g}] must lie in [0, {num_protos}) (prototypes[{g}] rows), "
                f"got values in [{int(labels.min())}, {int(labels.max())}]"
            )
        if concentrations is not None:
            phi = concentrations[g]
            if not isinstance(phi, torch.Tensor) or not phi.is_floating_point():
                raise TypeError(
                    f"concentrations[{g}] must be a floating-point tensor, "
                    f"got {getattr(phi, 'dtype', type(phi).__name__)}"
                )
            if phi.shape != (num_protos,):
                raise ValueError(
                    f"concentrations[{g}] must have shape ({num_protos},), got {tuple(phi.shape)}"
                )
            check_finite(phi, f"concentrations[{g}]")
            floor = torch.finfo(q.dtype).max ** -0.5
            if not bool((phi >= floor).all()):
                raise ValueError(
                    f"concentrations[{g}] must be >= {floor:.3g} (for {q.dtype} embeddings: "
                    f"smaller ones overflow the logits q.c/phi or their gradient), "
                    f"got minimum {float(phi.min()):.3g}"
                )


class ProtoNCE(nn.Module):
    r"""ProtoNCE: the prototype term of Prototypical Contrastive Learning (Li et al., ICLR 2021).

    For each granularity :math:`g` (one k-means result with :math:`k_g` prototypes
    :math:`c_j` and concentrations :math:`\phi_j`) and each sample :math:`i` with positive
    prototype :math:`s = a_i`:

    .. math::
        \ell_i^{g} = -\log \frac{\exp(q_i\cdot c_s/\phi_s)}
        {\exp(q_i\cdot c_s/\phi_s) + \sum_{j \in S_i} \exp(q_i\cdot c_j/\phi_j)},
        \qquad \mathcal{L} = \frac{1}{G}\sum_g \frac{1}{N}\sum_i \ell_i^{g}

    Each logit is divided by the concentration of *its own* prototype; the positive sits at
    index 0 of every row. :math:`S_i` holds :math:`r = \min(\text{num\_negatives}, k_g - 1)`
    negative prototypes drawn uniformly without replacement, separately for every sample,
    from the :math:`k_g - 1` prototypes other than its positive. The clamp means a
    granularity never asks for more negatives than exist (the fault of PCL's release when
    ``num_negatives >= k_g``); with :math:`k_g = 1` there is no negative and the term is 0.
    PCL's release instead draws one negative set per batch and also contrasts against the
    other samples' positives; per-sample sampling keeps every row's positive out of its own
    negatives.

    Args:
        temperature: the concentration of every prototype when ``concentrations`` is
            ``None`` (PCL's ablation without concentration estimation); estimated
            concentrations are usually rescaled to this mean
            (:func:`anchorlearn.cluster.estimate_concentration`).
        num_negatives: :math:`r`, negative prototypes per sample (PCL: 16000).

    Shapes:
        ``q``: ``(N, D)`` L2-normalised; per granularity ``assignments[g]``: ``(N,)`` long in
        ``[0, k_g)``; ``prototypes[g]``: ``(k_g, D)``; ``concentrations[g]``: ``(k_g,)`` > 0,
        or ``concentrations=None``. ``generator`` (on the device of ``q``, or the CPU) makes
        the negative sampling reproducible. Returns ``{"loss", "protonce"}``, scalars.
    """

    def __init__(self, temperature: float = 0.2, num_negatives: int = 16000) -> None:
        super().__init__()
        self.temperature = check_positive(temperature, "temperature")
        self.num_negatives = check_positive_int(num_negatives, "num_negatives")

    def sample_negatives(
        self,
        positives: torch.Tensor,
        num_prototypes: int,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Indices ``(N, r)`` of negative prototypes, ``r = min(num_negatives, k - 1)``.

        Row ``i`` is a uniform sample without replacement from ``[0, k) \\ {positives[i]}``:
        the ``r`` smallest of ``k`` uniform keys, the positive's key set to ``+inf``.
        """
        n = positives.shape[0]
        r = min(self.num_negatives, num_prototypes - 1)
        device = positives.device if generator is None else generator.device
        keys = torch.rand(n, num_prototypes, generator=generator, device=device)
        keys = keys.to(positives.device)
        keys.scatter_(1, positives[:, None], float("inf"))
        return keys.topk(r, dim=1, largest=False, sorted=False).indices

    def forward(
        self,
        q: torch.Tensor,
        assignments: Sequence[torch.Tensor],
        prototypes: Sequence[torch.Tensor],
        concentrations: Sequence[torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        q = check_matrix(q, "q")
        check_l2_normalised(q, "q")
        check_prototype_inputs(q, assignments, prototypes, concentrations)
        if q.shape[0] == 0:  # an empty batch: zero, attached to the graph
            zero = connected_zero(q)
            return {"loss": zero, "protonce": zero}
        loss = self._loss(q, assignments, prototypes, concentrations, generator)
        return {"loss": loss, "protonce": loss}

    def _loss(
        self,
        q: torch.Tensor,
        assignments: Sequence[torch.Tensor],
        prototypes: Sequence[torch.Tensor],
        concentrations: Sequence[torch.Tensor] | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """The ProtoNCE scalar for inputs already validated by :meth:`forward`, computed in
        float32 (float64 for float64 ``q``) with autocast off."""
        if concentrations is None:
            concentrations = [p.new_full((p.shape[0],), self.temperature) for p in prototypes]
        dtype = loss_compute_dtype(q.dtype)
        terms = []
        with autocast_off(q):
            q = q.to(dtype)
            for labels, protos, phi in zip(assignments, prototypes, concentrations, strict=True):
                labels = labels.long().to(q.device)
                logits_all = (q @ protos.to(dtype).t()) / phi.to(dtype)
                negatives = self.sample_negatives(labels, protos.shape[0], generator)
                logits = torch.cat(
                    [logits_all.gather(1, labels[:, None]), logits_all.gather(1, negatives)], dim=1
                )
                target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
                terms.append(F.cross_entropy(logits, target))
        return torch.stack(terms).mean()
