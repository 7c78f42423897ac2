"""The E-step of prototypical contrastive learning (PCL, Li et al. 2021), DDP-aware.

Each rank embeds its share of the training set (:func:`embed_shard`); then
:func:`gather_and_cluster` gathers the embeddings, clusters them at every granularity with
:func:`~anchorlearn.cluster.kmeans` and estimates each prototype's concentration
(:func:`~anchorlearn.cluster.estimate_concentration`); rank 0 clusters and broadcasts, so
every rank ends with the same :class:`EStepResult`. Training loops call these at every epoch
start after a warm-up (see :class:`anchorlearn.engine.ssl_module.EStepCallback`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from anchorlearn._checks import check_label_range, check_positive_int
from anchorlearn._dist import is_distributed
from anchorlearn.cluster.concentration import estimate_concentration
from anchorlearn.cluster.kmeans import kmeans

__all__ = ["EStepResult", "embed_shard", "gather_and_cluster"]


@dataclass(frozen=True)
class EStepResult:
    """One E-step, a list entry per granularity ``g``.

    Attributes:
        prototypes: ``(k_g, D)`` float32, L2-normalised k-means centroids.
        concentrations: ``(k_g,)`` float32, strictly positive, mean = the temperature.
        assignments: ``(N,)`` int64 in ``[0, k_g)``, the cluster of every training sample.
    """

    prototypes: list[torch.Tensor]
    concentrations: list[torch.Tensor]
    assignments: list[torch.Tensor]


def _gather_rows(features: torch.Tensor, indices: torch.Tensor, num_samples: int) -> torch.Tensor:
    """All ranks' ``(n_r, D)`` rows placed at their ``indices`` in one ``(num_samples, D)``."""
    world = dist.get_world_size()
    count = torch.tensor([features.shape[0]], device=features.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    longest = int(max(int(c) for c in counts))
    padded = features.new_zeros(longest, features.shape[1])
    padded[: features.shape[0]] = features
    padded_idx = indices.new_full((longest,), -1)
    padded_idx[: indices.shape[0]] = indices
    rows = [torch.empty_like(padded) for _ in range(world)]
    idxs = [torch.empty_like(padded_idx) for _ in range(world)]
    dist.all_gather(rows, padded)
    dist.all_gather(idxs, padded_idx)
    all_rows = torch.cat([r[: int(c)] for r, c in zip(rows, counts, strict=True)])
    all_idx = torch.cat([i[: int(c)] for i, c in zip(idxs, counts, strict=True)])
    full = features.new_zeros(num_samples, features.shape[1])
    full[all_idx] = all_rows
    covered = torch.zeros(num_samples, dtype=torch.bool, device=features.device)
    covered[all_idx] = True
    if not bool(covered.all()):
        raise ValueError(
            f"the ranks' indices cover {int(covered.sum())} of {num_samples} samples: every "
            "training sample must be embedded by some rank"
        )
    return full


def gather_and_cluster(
    features: torch.Tensor,
    indices: torch.Tensor,
    num_samples: int,
    num_clusters: Sequence[int],
    *,
    temperature: float = 0.2,
    niter: int = 20,
    nredo: int = 1,
    seed: int = 0,
    backend: str = "auto",
    init: str = "auto",
    warm_start: int | None = None,
) -> EStepResult:
    """The E-step of PCL on embeddings that may be spread over DDP ranks.

    Each rank passes the embeddings ``features`` ``(n_r, D)`` of the training samples it
    embedded and their positions ``indices`` ``(n_r,)`` in the training set of
    ``num_samples`` samples (duplicates across ranks are allowed: the copies are equal).
    Under an initialised ``torch.distributed`` group with more than one rank, the rows are
    gathered, rank 0 clusters them and broadcasts the result, so that every rank returns
    the same :class:`EStepResult`; without one, ``features`` must hold every sample.

    Per granularity ``k`` in ``num_clusters``: :func:`~anchorlearn.cluster.kmeans` (``niter``
    iterations, ``nredo`` restarts, seeded with ``seed``, initialised by ``init``:
    ``"k-means++"``, ``"random"`` or ``"auto"``, the library default; ``warm_start`` as
    there; centroids L2-normalised) and
    :func:`~anchorlearn.cluster.estimate_concentration`, measured to the centroids before
    normalisation (as PCL) and rescaled to mean ``temperature``.
    Collective calls are made on the device of ``features`` (a CUDA tensor under NCCL).
    """
    if features.ndim != 2 or indices.shape != features.shape[:1]:
        raise ValueError(
            f"features must be (n, D) and indices (n,), got {tuple(features.shape)} and "
            f"{tuple(indices.shape)}"
        )
    check_label_range(indices, num_samples, None, "indices")
    ks = [int(k) for k in num_clusters]
    if is_distributed():
        full = _gather_rows(features.detach().float(), indices.long(), num_samples)
    else:
        full = features.detach().float().new_zeros(num_samples, features.shape[1])
        full[indices.long()] = features.detach().float()
        if torch.unique(indices).numel() != num_samples:
            raise ValueError(
                f"indices cover {torch.unique(indices).numel()} of {num_samples} samples: "
                "pass the embeddings of the whole training set"
            )
    device, dim = full.device, full.shape[1]
    is_root = not is_distributed() or dist.get_rank() == 0
    result = EStepResult([], [], [])
    for g, k in enumerate(ks):
        if k > num_samples:
            raise ValueError(
                f"num_clusters[{g}]={k} exceeds the {num_samples} training samples: use fewer "
                "clusters"
            )
        prototypes = torch.empty(k, dim, device=device)
        assignments = torch.empty(num_samples, dtype=torch.long, device=device)
        phi = torch.empty(k, device=device)
        failure: Exception | None = None
        if is_root:
            try:
                clusters = kmeans(
                    full,
                    k,
                    niter=niter,
                    nredo=nredo,
                    seed=seed + g,
                    backend=backend,
                    init=None if init == "auto" else init,
                    warm_start=warm_start,
                )
                prototypes = clusters.centroids.to(device)
                assignments = clusters.assignments.to(device)
                # as PCL: distances to the cluster means, before they are normalised
                raw = clusters.raw_centroids.to(device)
                phi = estimate_concentration(full, raw, assignments, temperature).float()
            except Exception as err:  # re-raised below, on every rank together
                failure = err
        if is_distributed():
            # the other ranks must not wait forever on a broadcast rank 0 never sends
            status = torch.tensor([0 if failure is None else 1], device=device)
            dist.broadcast(status, src=0)
            if int(status) != 0:
                if failure is not None:
                    raise failure
                raise RuntimeError(f"the E-step failed on rank 0 (k={k}); see its error")
            for tensor in (prototypes, assignments, phi):
                dist.broadcast(tensor, src=0)
        elif failure is not None:
            raise failure
        result.prototypes.append(prototypes)
        result.concentrations.append(phi)
        result.assignments.append(assignments)
    return result


@torch.no_grad()
def embed_shard(
    embed: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    dim: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One rank's share of the E-step's embedding: the samples ``rank::world_size`` of
    ``images`` ``(N, ...)``, moved to ``device`` ``batch_size`` at a time and embedded by
    ``embed`` (``(b, ...)`` -> ``(b, dim)``).

    Returns the embeddings ``(n_r, dim)`` float32 and their positions ``indices`` ``(n_r,)``
    int64 in ``images``, both on ``device``: the input of :func:`gather_and_cluster`.
    """
    check_positive_int(world_size, "world_size")
    check_positive_int(batch_size, "batch_size")
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    indices = torch.arange(rank, images.shape[0], world_size)
    chunks = []
    for start in range(0, indices.shape[0], batch_size):
        batch = images[indices[start : start + batch_size]].to(device)
        chunks.append(embed(batch).float())
    features = torch.cat(chunks) if chunks else torch.empty(0, dim, device=device)
    return features, indices.to(device)
