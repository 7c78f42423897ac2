"""k-means for the E-step of prototypical contrastive learning: faiss when installed, torch else.

Both backends run Lloyd iterations and return the same :class:`ClusterResult`; the final
assignments and inertia are always recomputed from the final centroids (one more assignment
step), so that the two backends and scikit-learn report comparable numbers.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from anchorlearn.losses._checks import check_finite, check_positive_int

__all__ = ["ClusterResult", "kmeans"]

Backend = Literal["auto", "faiss", "torch"]
Init = Literal["k-means++", "random"]

# rows x centroids per block of the distance matrix
_CPU_BLOCK_ELEMENTS = 1 << 18
_DEVICE_BLOCK_ELEMENTS = 1 << 24
_KMEANS_PP_MAX_K = 1000  # default seeding: k-means++ up to this k, random rows above
_SEEDING_POINTS_PER_CLUSTER = 40  # k-means++ seeds from at most 40 k random rows


@dataclass(frozen=True)
class ClusterResult:
    """The outcome of :func:`kmeans`.

    Attributes:
        centroids: ``(k, D)`` float32, L2-normalised rows (a centroid of norm 0 stays 0).
        assignments: ``(N,)`` long, index of the nearest raw centroid.
        inertia: sum over points of the squared Euclidean distance to that raw centroid.
        counts: ``(k,)`` long, the number of points assigned to each centroid.
        raw_centroids: ``(k, D)`` float32, the centroids before normalisation: the means
            of their clusters (normalised means under ``spherical=True``), to which the
            assignments and the inertia refer, and to which PCL measures the
            concentration.
    """

    centroids: torch.Tensor
    assignments: torch.Tensor
    inertia: float
    counts: torch.Tensor
    raw_centroids: torch.Tensor


def _faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def nearest_centroids(
    x: torch.Tensor, centroids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Nearest centroid of each row and its squared distance, in row blocks.

    Uses :math:`\lVert x - c\rVert^2 = \lVert x\rVert^2 - 2\,x\cdot c + \lVert c\rVert^2`
    (clamped at 0 against round-off): one fused ``addmm`` gives
    :math:`\lVert c\rVert^2 - 2\,x\cdot c` per block, whose row minimum picks the centroid;
    :math:`\lVert x\rVert^2` is added to the minima only. Blocks hold ``2**18`` distances on
    the CPU (they stay in cache) and ``2**24`` on other devices.

    Shapes:
        ``x``: ``(N, D)``; ``centroids``: ``(k, D)``. Returns indices ``(N,)`` long and
        squared distances ``(N,)`` in the dtype of ``x``.
    """
    n, k = x.shape[0], centroids.shape[0]
    c_sq = (centroids * centroids).sum(dim=1)[None, :]
    elements = _CPU_BLOCK_ELEMENTS if x.device.type == "cpu" else _DEVICE_BLOCK_ELEMENTS
    block = max(1, elements // max(1, k))
    indices = torch.empty(n, dtype=torch.long, device=x.device)
    distances = torch.empty(n, dtype=x.dtype, device=x.device)
    for start in range(0, n, block):
        stop = min(n, start + block)
        partial = torch.addmm(c_sq, x[start:stop], centroids.t(), alpha=-2.0)
        torch.min(partial, dim=1, out=(distances[start:stop], indices[start:stop]))
    distances += (x * x).sum(dim=1)
    return indices, distances.clamp_min_(0.0)


def _init_centroids(
    x: torch.Tensor, k: int, init: Init, generator: torch.Generator
) -> torch.Tensor:
    """``k`` initial centroids: distinct random rows, or greedy k-means++.

    Greedy k-means++ (Arthur and Vassilvitskii 2007, with the greedy trials of their
    section 6): each new centroid is the best, by the resulting inertia, of
    ``2 + floor(ln k)`` rows drawn with probability proportional to their squared distance
    to the nearest centroid chosen so far. The trials are scored together in one matrix
    product. When ``N > 40 k`` the seeding draws from ``40 k`` random rows only.
    """
    n = x.shape[0]
    if init == "random":
        return x[torch.randperm(n, generator=generator)[:k].to(x.device)].clone()
    if n > _SEEDING_POINTS_PER_CLUSTER * k:
        # seeding looks at a random subset: it only has to place k starting points
        subset = torch.randperm(n, generator=generator)[: _SEEDING_POINTS_PER_CLUSTER * k]
        x, n = x[subset.to(x.device)], _SEEDING_POINTS_PER_CLUSTER * k
    trials = 2 + int(math.log(k))
    x_sq = (x * x).sum(dim=1)
    x_t = x.t().contiguous()  # (D, N): the product with a few candidate rows reads it in order

    def sq_dist_to(rows: torch.Tensor) -> torch.Tensor:  # (len(rows), N)
        dist = torch.addmm(x_sq[None, :], x[rows], x_t, alpha=-2.0)
        return (dist + x_sq[rows][:, None]).clamp_min_(0.0)

    first = torch.randint(n, (1,), generator=generator).to(x.device)
    picks = [int(first)]
    min_sq = sq_dist_to(first)[0]
    for _ in range(1, k):
        # inverse-CDF draws of rows with probability min_sq / sum(min_sq)
        cumulative = torch.cumsum(min_sq.double(), dim=0)
        total = float(cumulative[-1])
        if total > 0:
            u = torch.rand(trials, generator=generator, dtype=torch.float64) * total
            cand = torch.searchsorted(cumulative, u.to(x.device), right=True).clamp_max(n - 1)
        else:  # fewer distinct points than clusters: any row will do
            cand = torch.randint(n, (1,), generator=generator).to(x.device)
        candidate_min = torch.minimum(min_sq[None, :], sq_dist_to(cand))
        best = int(candidate_min.double().sum(dim=1).argmin())
        picks.append(int(cand[best]))
        min_sq = candidate_min[best]
    return x[torch.tensor(picks, device=x.device)].clone()


def _lloyd(
    x: torch.Tensor, centroids: torch.Tensor, niter: int, spherical: bool, verbose: bool
) -> torch.Tensor:
    """``niter`` Lloyd iterations; an empty cluster is re-seeded with the farthest points."""
    k = centroids.shape[0]
    for it in range(niter):
        assign, sq_dist = nearest_centroids(x, centroids)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        nonempty = counts > 0
        centroids = torch.where(
            nonempty[:, None], sums / counts.clamp_min(1)[:, None].to(x.dtype), centroids
        )
        empty = (~nonempty).nonzero().flatten()
        if empty.numel() > 0:
            farthest = sq_dist.topk(min(empty.numel(), x.shape[0])).indices
            centroids[empty[: farthest.numel()]] = x[farthest]
        if spherical:
            centroids = F.normalize(centroids, dim=1)
        if verbose:
            print(
                f"kmeans iteration {it + 1}/{niter}: inertia {float(sq_dist.sum()):.6g}, "
                f"{empty.numel()} empty cluster(s) re-seeded"
            )
    return centroids


def _best_restart(
    x: torch.Tensor,
    k: int,
    nredo: int,
    seed: int,
    spherical: bool,
    init: Init,
    refine: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``nredo`` restarts, each seeded by :func:`_init_centroids` and improved by ``refine``;
    the centroids of lowest inertia (the first on ties). One restart is not scored."""
    generator = torch.Generator().manual_seed(seed)
    best: tuple[float, torch.Tensor] | None = None
    for _ in range(nredo):
        start = _init_centroids(x, k, init, generator)
        if spherical:
            start = F.normalize(start, dim=1)
        centroids = refine(start)
        if nredo == 1:
            return centroids
        inertia = float(nearest_centroids(x, centroids)[1].double().sum())
        if best is None or inertia < best[0]:
            best = (inertia, centroids)
    assert best is not None
    return best[1]


def _faiss_kmeans(
    x: torch.Tensor,
    k: int,
    niter: int,
    nredo: int,
    seed: int,
    spherical: bool,
    init: Init,
    verbose: bool,
) -> torch.Tensor:
    import faiss

    data = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
    n, d = data.shape

    def make(restarts: int) -> faiss.Kmeans:
        return faiss.Kmeans(
            d,
            k,
            niter=niter,
            nredo=restarts,
            seed=seed,
            spherical=spherical,
            verbose=verbose,
            min_points_per_centroid=1,
            max_points_per_centroid=max(256, -(-n // k)),  # no subsampling: use every point
        )

    if init == "random":  # faiss's own initialisation and restarts
        clus = make(nredo)
        clus.train(data)
        return torch.from_numpy(np.array(clus.centroids, dtype=np.float32).reshape(k, d))

    def refine(start: torch.Tensor) -> torch.Tensor:
        clus = make(1)
        clus.train(data, init_centroids=np.ascontiguousarray(start.numpy()))
        return torch.from_numpy(np.array(clus.centroids, dtype=np.float32).reshape(k, d))

    return _best_restart(torch.from_numpy(data), k, nredo, seed, spherical, init, refine)


def kmeans(
    x: torch.Tensor | np.ndarray,
    k: int,
    *,
    niter: int = 20,
    nredo: int = 1,
    seed: int = 0,
    backend: Backend = "auto",
    spherical: bool = False,
    init: Init | None = None,
    verbose: bool = False,
) -> ClusterResult:
    r"""Cluster the rows of ``x`` into ``k`` groups with Lloyd's k-means.

    Minimises the inertia :math:`\sum_i \min_j \lVert x_i - c_j\rVert^2` by ``niter``
    alternations of assignment and mean update, restarted ``nredo`` times (the restart of
    lowest inertia is kept).

    Backends:
        - ``"faiss"``: ``faiss.Kmeans``, imported lazily, on the CPU in float32, trained on
          every point (no subsampling), started from the centroids of the initialisation
          below (``init="random"`` leaves the seeding to faiss, seeded with ``seed``). An
          empty cluster is repaired by splitting a large one.
        - ``"torch"``: distances are computed in row blocks through
          :math:`\lVert x\rVert^2 - 2x\cdot c + \lVert c\rVert^2`; a cluster left empty
          by an assignment step is re-seeded with the point farthest from its centroid
          (the next farthest for the next empty one). Runs on the device of ``x``, in
          float64 for float64 input and float32 otherwise.
        - ``"auto"``: faiss when installed and ``x`` is on the CPU, torch otherwise.

    Initialisations, drawn from a ``torch.Generator`` seeded with ``seed``: ``"random"``
    picks ``k`` distinct rows; ``"k-means++"`` is greedy D² sampling (see
    :func:`_init_centroids`), ``k`` sequential steps over at most ``40 k`` rows. The
    default (``init=None``) is k-means++ up to ``k = 1000`` and random rows above, where
    the sequential seeding would cost more than Lloyd itself (PCL's faiss runs with
    k in the tens of thousands start from random rows too).

    ``spherical=True`` L2-normalises the centroids after every update (assignment by inner
    product when ``x`` is normalised). The returned centroids are L2-normalised in every
    case; the assignments and inertia refer to the centroids before that normalisation
    (``raw_centroids``).
    A centroid may still end empty after the last update (``counts`` 0).

    Args:
        x: ``(N, D)`` finite floating-point tensor (or array).
        k: number of clusters, ``1 <= k <= N``.
        niter: Lloyd iterations per restart (PCL: 20).
        nredo: restarts.
        seed: seeds the initialisation (both backends).
        backend: ``"auto"``, ``"faiss"`` or ``"torch"``.
        spherical: normalise the centroids during the iterations.
        init: ``"k-means++"``, ``"random"`` or ``None`` (k-means++ for ``k <= 1000``).
        verbose: print progress.

    Returns:
        :class:`ClusterResult`, tensors on the device of ``x``.
    """
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (N, D), got {x.ndim}-D shape {tuple(x.shape)}")
    k = check_positive_int(k, "k")
    niter = check_positive_int(niter, "niter")
    nredo = check_positive_int(nredo, "nredo")
    if k > x.shape[0]:
        raise ValueError(f"k must be <= the number of points N={x.shape[0]}, got k={k}")
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"backend must be one of ('auto', 'faiss', 'torch'), got {backend!r}")
    if init not in (None, "k-means++", "random"):
        raise ValueError(f"init must be one of (None, 'k-means++', 'random'), got {init!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    check_finite(x, "x")

    if backend == "auto":
        backend = "faiss" if _faiss_available() and x.device.type == "cpu" else "torch"
    if backend == "faiss" and not _faiss_available():
        raise ImportError(
            "backend='faiss' needs faiss: pip install 'anchorlearn[faiss]' (or faiss-cpu)"
        )

    work = x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    if init is None:
        init = "k-means++" if k <= _KMEANS_PP_MAX_K else "random"
    if backend == "faiss":
        centroids = _faiss_kmeans(work, k, niter, nredo, seed, spherical, init, verbose)
        centroids = centroids.to(device=work.device, dtype=work.dtype)
    else:
        centroids = _best_restart(
            work,
            k,
            nredo,
            seed,
            spherical,
            init,
            lambda start: _lloyd(work, start, niter, spherical, verbose),
        )
    assignments, sq_dist = nearest_centroids(work, centroids)
    return ClusterResult(
        centroids=F.normalize(centroids, dim=1).float(),
        assignments=assignments,
        inertia=float(sq_dist.double().sum()),
        counts=torch.bincount(assignments, minlength=k),
        raw_centroids=centroids.float(),
    )
