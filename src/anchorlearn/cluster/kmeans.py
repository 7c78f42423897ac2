"""k-means for the E-step of prototypical contrastive learning: torch by default, or faiss.

Both backends run Lloyd iterations and return the same :class:`ClusterResult`; the final
assignments and inertia always refer to the final centroids (the torch backend's last
assignment step, one more assignment step after faiss), so that the two backends and
scikit-learn report comparable numbers.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from anchorlearn._checks import check_finite, check_positive_int

__all__ = ["ClusterResult", "kmeans"]

Backend = Literal["auto", "faiss", "torch"]
Init = Literal["k-means++", "random"]
# centroids, and the assignment to them with its inertia when already known
Fitted = tuple[torch.Tensor, tuple[torch.Tensor, float] | None]

# rows x centroids per block of the distance matrix
_CPU_BLOCK_ELEMENTS = 1 << 18
_DEVICE_BLOCK_ELEMENTS = 1 << 24
_KMEANS_PP_MAX_K = 1000  # default seeding: k-means++ up to this k, random rows above
_SEEDING_POINTS_PER_CLUSTER = 40  # k-means++ seeds from at most 40 k random rows
# pruned assignment (torch backend on the CPU): from this many clusters on, comparing each
# row with at most this share of the centroids, in batched products over this many clusters
_PRUNE_MIN_K = 128
_PRUNE_MAX_CANDIDATES = 0.25
_PRUNE_GROUP = 8
_PRUNE_GROUP_ROWS = 4096  # a larger cluster forms a group of its own
_PRUNE_ROUNDOFF = 1e-5  # relative round-off allowed for in squared distances
# below _PRUNE_MIN_K clusters on the CPU: Lloyd with per-pair distance bounds, a (k, N)
# float matrix, up to this many elements (128 MiB in float32), plain Lloyd above
_BOUNDS_MAX_ELEMENTS = 1 << 25
_WARM_START_ROWS_PER_CLUSTER = 256  # default warm start of the torch backend


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
    x: torch.Tensor, centroids: torch.Tensor, x_sq: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Nearest centroid of each row and its squared distance, in row blocks.

    Uses :math:`\lVert x - c\rVert^2 = \lVert x\rVert^2 - 2\,x\cdot c + \lVert c\rVert^2`
    (clamped at 0 against round-off): one fused ``addmm`` gives
    :math:`\lVert c\rVert^2 - 2\,x\cdot c` per block, whose row minimum picks the centroid;
    :math:`\lVert x\rVert^2` (``x_sq``, computed when not given) is added to the minima
    only. Blocks hold ``2**18`` distances on the CPU (they stay in cache) and ``2**24`` on
    other devices.

    Shapes:
        ``x``: ``(N, D)``; ``centroids``: ``(k, D)``; ``x_sq``: ``(N,)``. Returns indices
        ``(N,)`` long and squared distances ``(N,)`` in the dtype of ``x``.
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
    distances += (x * x).sum(dim=1) if x_sq is None else x_sq
    return indices, distances.clamp_min_(0.0)


def _pruned_nearest_centroids(
    x_padded: torch.Tensor,
    x_sq: torch.Tensor,
    centroids: torch.Tensor,
    assign: torch.Tensor,
    upper: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    r""":func:`nearest_centroids` (exact up to ties) from fewer distances, on the CPU.

    ``upper`` bounds each row's distance to its centroid ``assign`` from above. If
    :math:`\lVert c_a - c_l\rVert \ge 2u \ge 2\lVert x - c_a\rVert` then
    :math:`\lVert x - c_l\rVert \ge \lVert c_a - c_l\rVert - \lVert x - c_a\rVert
    \ge \lVert x - c_a\rVert` (triangle inequality), so the nearest centroid of ``x`` lies
    among the centroids closer than :math:`2u` to :math:`c_a`. The rows of each cluster
    are compared with the centroids that cover their largest bound only, in batched
    products over groups of clusters of similar size (at most :data:`_PRUNE_GROUP`
    clusters and :data:`_PRUNE_GROUP_ROWS` padded rows, so that one large cluster does not
    pad the others); a row whose bound reaches past the
    :data:`_PRUNE_MAX_CANDIDATES` share of centroids nearest its own is compared with all.
    Bounds and centroid distances carry a margin for float round-off.

    ``x_padded`` is ``x`` with one extra zero row (the padding of the groups).
    """
    x = x_padded[:-1]
    n, k = x.shape[0], centroids.shape[0]
    c_sq = (centroids * centroids).sum(dim=1)
    cap = max(1, min(k - 1, int(_PRUNE_MAX_CANDIDATES * k)))
    centre_sq = torch.addmm(c_sq[None, :] + c_sq[:, None], centroids, centroids.t(), alpha=-2.0)
    near_dist, near = centre_sq.clamp_min_(0.0).sqrt_().topk(cap + 1, dim=1, largest=False)
    # 2u, widened by the round-off of the expanded squared distances
    slack = float(c_sq.max().mul(2 * _PRUNE_ROUNDOFF).sqrt())
    reach = upper.mul(2 * (1 + _PRUNE_ROUNDOFF)).add_(slack)
    outlier = reach > near_dist[:, cap].index_select(0, assign)

    indices = torch.empty_like(assign)
    distances = torch.empty_like(x_sq)
    rows = outlier.nonzero().flatten()
    if rows.numel() > 0:
        indices[rows], distances[rows] = nearest_centroids(
            x.index_select(0, rows), centroids, x_sq.index_select(0, rows)
        )

    # the remaining rows, in groups of clusters of similar size: each group's rows in a
    # (clusters, largest cluster) index matrix padded with n (the zero row)
    rows = (~outlier).nonzero().flatten()
    if rows.numel() > 0:
        own = assign.index_select(0, rows)
        counts = torch.bincount(own, minlength=k)
        by_size = torch.argsort(counts)  # clusters, smallest first
        position = torch.empty_like(by_size)
        position[by_size] = torch.arange(k)
        key = position.index_select(0, own)  # a row's cluster, as its place in by_size
        order = torch.argsort(key, stable=True)
        rows, key = rows.index_select(0, order), key.index_select(0, order)
        sizes = counts.index_select(0, by_size)
        starts = torch.cumsum(sizes, 0) - sizes
        rank = torch.arange(rows.numel()) - starts.index_select(0, key)
        reach_padded = torch.cat([reach, reach.new_zeros(1)])
        size_list, start_list = sizes.tolist(), starts.tolist()
        a = next(i for i, size in enumerate(size_list) if size > 0)
        while a < k:
            b = a + 1  # group a..b-1: at most _PRUNE_GROUP clusters, _PRUNE_GROUP_ROWS padded rows
            while (
                b < k and b - a < _PRUNE_GROUP and (b - a + 1) * size_list[b] <= _PRUNE_GROUP_ROWS
            ):
                b += 1
            g, p = b - a, size_list[b - 1]
            lo, hi = start_list[a], start_list[b - 1] + p
            idx = torch.full((g, p), n, dtype=torch.long)
            idx[key[lo:hi] - a, rank[lo:hi]] = rows[lo:hi]
            group = by_size[a:b]
            group_reach = reach_padded.index_select(0, idx.view(-1)).view(g, p).amax(dim=1)
            needed = torch.searchsorted(near_dist.index_select(0, group), group_reach[:, None])
            m = min(max(int(needed.max()), 1), cap + 1)
            cand = near.index_select(0, group)[:, :m]
            flat = cand.reshape(-1)
            dist = torch.baddbmm(
                c_sq.index_select(0, flat).view(g, 1, m),
                x_padded.index_select(0, idx.view(-1)).view(g, p, -1),
                centroids.index_select(0, flat).view(g, m, -1).transpose(1, 2),
                alpha=-2.0,
            )
            best, arg = dist.min(dim=2)
            valid = idx < n
            picked = idx[valid]
            indices[picked] = cand.gather(1, arg)[valid]
            distances[picked] = best[valid] + x_sq.index_select(0, picked)
            a = b
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


def _distance_bound(
    sq_dist: torch.Tensor,
    x_sq: torch.Tensor,
    old: torch.Tensor,
    new: torch.Tensor,
    assign: torch.Tensor,
) -> torch.Tensor:
    """An upper bound on each row's distance to its centroid after the centroids moved
    from ``old`` to ``new``: |x - c_new| <= |x - c_old| + |c_new - c_old|, where
    ``sq_dist`` holds the squared |x - c_old| as computed (with room for its round-off)."""
    slack = _PRUNE_ROUNDOFF * (x_sq + (old * old).sum(dim=1).max())
    shift = (new - old).norm(dim=1)
    return (sq_dist + slack).sqrt_().add_(shift.index_select(0, assign))


def _own_sq_distances(
    x: torch.Tensor, centroids: torch.Tensor, assign: torch.Tensor
) -> torch.Tensor:
    """Squared distance of each row to its assigned centroid, as a difference (exact up to
    float round-off), in row blocks that stay in cache."""
    out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    block = max(1, _CPU_BLOCK_ELEMENTS // max(1, x.shape[1]))
    for start in range(0, x.shape[0], block):
        diff = x[start : start + block] - centroids.index_select(0, assign[start : start + block])
        out[start : start + block] = (diff * diff).sum(dim=1)
    return out


def _mean_update(
    sums: torch.Tensor,
    counts: torch.Tensor,
    centroids: torch.Tensor,
    x: torch.Tensor,
    sq_dist: torch.Tensor | Callable[[], torch.Tensor],
) -> tuple[torch.Tensor, int]:
    """The Lloyd update: the mean of each cluster; a cluster left empty takes the row
    farthest from its centroid (the next farthest for the next empty one; ``sq_dist`` holds
    each row's squared distance to its centroid, or computes it, only then). Returns the
    new centroids and the number of clusters re-seeded."""
    nonempty = counts > 0
    means = (sums / counts.clamp_min(1)[:, None].to(sums.dtype)).to(centroids.dtype)
    updated = torch.where(nonempty[:, None], means, centroids)
    empty = (~nonempty).nonzero().flatten()
    if empty.numel() > 0:
        far = sq_dist() if callable(sq_dist) else sq_dist
        farthest = far.topk(min(empty.numel(), x.shape[0])).indices
        updated[empty[: farthest.numel()]] = x[farthest]
    return updated, empty.numel()


def _bounded_lloyd(
    x: torch.Tensor, centroids: torch.Tensor, niter: int, spherical: bool, verbose: bool
) -> Fitted:
    r""":func:`_lloyd` for few clusters on the CPU: Lloyd with Elkan's distance bounds
    (Elkan 2003), so that an assignment step recomputes only the rows whose nearest
    centroid may have changed.

    For every row ``i`` and centroid ``j`` a lower bound :math:`l_{ji}` on
    :math:`\lVert x_i - c_j\rVert` is kept in a ``(k, N)`` matrix, and an upper bound
    :math:`u_i` on the distance to the row's own centroid. When the centroids move by
    :math:`\delta_j` the triangle inequality gives :math:`u_i + \delta_{a_i}` and
    :math:`l_{ji} - \delta_j` as new bounds; a row whose smallest lower bound (over the
    other centroids) stays at or above its upper bound keeps its centroid, every other row
    is compared with all centroids (one matrix product over those rows), which makes its
    bounds exact again. The bounds carry a margin for the round-off of the expanded
    squared distances. The cluster sums are kept in float64 and updated from the rows that
    changed cluster only; the inertia comes from them,
    :math:`\sum_i\lVert x_i\rVert^2 - 2\sum_j c_j\cdot s_j + \sum_j n_j\lVert c_j\rVert^2`.
    """
    n, k = x.shape[0], centroids.shape[0]
    x_sq = (x * x).sum(dim=1)
    x_slack = x_sq * (2 * _PRUNE_ROUNDOFF)
    c_sq = (centroids * centroids).sum(dim=1)
    # the first assignment: all (k, N) squared distances, which become the first bounds
    sq = torch.addmm(c_sq[:, None], centroids, x.t(), alpha=-2.0).add_(x_sq).clamp_min_(0.0)
    best, assign = sq.min(dim=0)
    slack = x_slack + float(c_sq.max()) * 2 * _PRUNE_ROUNDOFF
    lower = sq.sub_(slack).clamp_min_(0.0).sqrt_()
    lower[assign, torch.arange(n, device=x.device)] = math.inf  # not a bound on the others
    upper = best.add_(slack).sqrt_()
    del sq, best
    counts = torch.bincount(assign, minlength=k)
    # exact float64 sums (the inertia below subtracts large terms), in cache-sized blocks
    sums = torch.zeros(centroids.shape, dtype=torch.float64, device=x.device)
    total_sq = torch.zeros((), dtype=torch.float64, device=x.device)
    block = max(1, _CPU_BLOCK_ELEMENTS // max(1, x.shape[1]))
    for start in range(0, n, block):
        rows64 = x[start : start + block].double()
        sums.index_add_(0, assign[start : start + block], rows64)
        total_sq += (rows64 * rows64).sum()
    ones = torch.ones(n, dtype=counts.dtype, device=x.device)

    def inertia() -> float:
        c = centroids.double()
        total = total_sq - 2 * (c * sums).sum() + (counts * (c * c).sum(dim=1)).sum()
        return max(float(total), 0.0)

    for it in range(niter):
        updated, reseeded = _mean_update(
            sums, counts, centroids, x, partial(_own_sq_distances, x, centroids, assign)
        )
        if spherical:
            updated = F.normalize(updated, dim=1)
        shift = (updated - centroids).norm(dim=1)
        centroids = updated
        c_sq = (centroids * centroids).sum(dim=1)
        upper += shift.index_select(0, assign)
        lower -= shift[:, None]
        rows = (lower.amin(dim=0) < upper).nonzero().flatten()
        moved = 0
        if rows.numel() > 0:
            dist = torch.addmm(c_sq[None, :], x.index_select(0, rows), centroids.t(), alpha=-2.0)
            dist += x_sq.index_select(0, rows)[:, None]
            best, new = dist.clamp_min_(0.0).min(dim=1)
            margin = x_slack.index_select(0, rows).add_(float(c_sq.max()) * 2 * _PRUNE_ROUNDOFF)
            lower[:, rows] = dist.sub_(margin[:, None]).clamp_min_(0.0).sqrt_().t()
            lower[new, rows] = math.inf
            upper[rows] = best.add_(margin).sqrt_()
            old = assign.index_select(0, rows)
            changed = (new != old).nonzero().flatten()
            moved = changed.numel()
            if moved > 0:
                src, dst, which = old[changed], new[changed], rows[changed]
                x_moved = x.index_select(0, which).double()
                sums.index_add_(0, src, x_moved, alpha=-1).index_add_(0, dst, x_moved)
                counts.index_add_(0, src, ones[:moved], alpha=-1).index_add_(0, dst, ones[:moved])
                assign[which] = dst
        if verbose:
            print(
                f"kmeans iteration {it + 1}/{niter}: inertia {inertia():.6g}, "
                f"{reseeded} empty cluster(s) re-seeded, {rows.numel()} of {n} rows compared "
                f"with every centroid, {moved} changed cluster"
            )
        if reseeded == 0 and moved == 0:
            break
    return centroids, (assign, inertia())


def _lloyd(
    x: torch.Tensor, centroids: torch.Tensor, niter: int, spherical: bool, verbose: bool
) -> Fitted:
    """At most ``niter`` Lloyd iterations (mean update, then assignment), stopping early at
    a fixed point (no assignment changed: a further update would return the same
    centroids). An empty cluster is re-seeded with the farthest points. On the CPU, with
    fewer than ``_PRUNE_MIN_K`` clusters the iterations keep distance bounds
    (:func:`_bounded_lloyd`, while its ``(k, N)`` matrix stays under
    ``_BOUNDS_MAX_ELEMENTS``), and from ``_PRUNE_MIN_K`` on the assignments after the first
    are computed by :func:`_pruned_nearest_centroids`; both give the assignments of the
    exhaustive search with fewer distances. Returns the centroids and the final assignment
    to them with its inertia."""
    n, k = x.shape[0], centroids.shape[0]
    cpu = x.device.type == "cpu"
    if cpu and k < _PRUNE_MIN_K and k * n <= _BOUNDS_MAX_ELEMENTS:
        return _bounded_lloyd(x, centroids, niter, spherical, verbose)
    x_sq = (x * x).sum(dim=1)
    prune = cpu and k >= _PRUNE_MIN_K
    x_padded = torch.cat([x, x.new_zeros(1, x.shape[1])]) if prune else x
    assign, sq_dist = nearest_centroids(x, centroids, x_sq)
    for it in range(niter):
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        updated, reseeded = _mean_update(sums, counts, centroids, x, sq_dist)
        if spherical:
            updated = F.normalize(updated, dim=1)
        if prune:
            upper = _distance_bound(sq_dist, x_sq, centroids, updated, assign)
            new_assign, sq_dist = _pruned_nearest_centroids(x_padded, x_sq, updated, assign, upper)
        else:
            new_assign, sq_dist = nearest_centroids(x, updated, x_sq)
        centroids = updated
        if verbose:
            print(
                f"kmeans iteration {it + 1}/{niter}: inertia {float(sq_dist.sum()):.6g}, "
                f"{reseeded} empty cluster(s) re-seeded"
            )
        converged = reseeded == 0 and bool(torch.equal(new_assign, assign))
        assign = new_assign
        if converged:
            break
    return centroids, (assign, float(sq_dist.double().sum()))


def _warm_started_lloyd(
    x: torch.Tensor,
    centroids: torch.Tensor,
    niter: int,
    spherical: bool,
    verbose: bool,
    rows_per_cluster: int,
    generator: torch.Generator,
) -> Fitted:
    """:func:`_lloyd` on all rows, started from :func:`_lloyd` on ``rows_per_cluster * k``
    random rows when there are more than twice as many rows (``rows_per_cluster`` 0: no
    warm start)."""
    n, k = x.shape[0], centroids.shape[0]
    sample = rows_per_cluster * k
    if rows_per_cluster > 0 and n > 2 * sample:
        rows = torch.randperm(n, generator=generator)[:sample].to(x.device)
        if verbose:
            print(f"kmeans warm start on {sample} random rows of {n}")
        centroids = _lloyd(x.index_select(0, rows), centroids, niter, spherical, verbose)[0]
        if verbose:
            print(f"kmeans on all {n} rows")
    return _lloyd(x, centroids, niter, spherical, verbose)


def _best_restart(
    x: torch.Tensor,
    k: int,
    nredo: int,
    seed: int,
    spherical: bool,
    init: Init,
    refine: Callable[[torch.Tensor, torch.Generator], Fitted],
) -> Fitted:
    """``nredo`` restarts, each seeded by :func:`_init_centroids` and improved by ``refine``;
    the fit of lowest inertia (the first on ties). One restart is not scored."""
    generator = torch.Generator().manual_seed(seed)
    best: tuple[float, Fitted] | None = None
    for _ in range(nredo):
        start = _init_centroids(x, k, init, generator)
        if spherical:
            start = F.normalize(start, dim=1)
        fitted = refine(start, generator)
        if nredo == 1:
            return fitted
        centroids, assigned = fitted
        if assigned is None:
            indices, sq_dist = nearest_centroids(x, centroids)
            assigned = (indices, float(sq_dist.double().sum()))
        inertia = assigned[1]
        if best is None or inertia < best[0]:
            best = (inertia, (centroids, assigned))
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

    def refine(start: torch.Tensor, generator: torch.Generator) -> Fitted:
        clus = make(1)
        clus.train(data, init_centroids=np.ascontiguousarray(start.numpy()))
        return torch.from_numpy(np.array(clus.centroids, dtype=np.float32).reshape(k, d)), None

    return _best_restart(torch.from_numpy(data), k, nredo, seed, spherical, init, refine)[0]


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
    warm_start: int | None = None,
    verbose: bool = False,
) -> ClusterResult:
    r"""Cluster the rows of ``x`` into ``k`` groups with Lloyd's k-means.

    Minimises the inertia :math:`\sum_i \min_j \lVert x_i - c_j\rVert^2` by at most
    ``niter`` alternations of assignment and mean update (both backends stop early at a
    fixed point), restarted ``nredo`` times (the restart of lowest inertia is kept).

    Backends:
        - ``"faiss"``: ``faiss.Kmeans``, imported lazily, on the CPU in float32, trained on
          every point (no subsampling), started from the centroids of the initialisation
          below (``init="random"`` leaves the seeding to faiss, seeded with ``seed``). An
          empty cluster is repaired by splitting a large one.
        - ``"torch"``: distances through
          :math:`\lVert x\rVert^2 - 2x\cdot c + \lVert c\rVert^2`; a cluster left empty
          by an assignment step is re-seeded with the point farthest from its centroid
          (the next farthest for the next empty one). Stops when no assignment changed.
          On the CPU the assignment steps skip distances that the triangle inequality
          proves unneeded, with the assignments of the exhaustive search: below
          ``k = 128`` through Elkan's per-pair distance bounds (:func:`_bounded_lloyd`,
          which keeps a ``(k, N)`` float matrix and falls back to plain Lloyd above
          ``2**25`` elements), from ``k = 128`` on by comparing each row with the
          centroids near its own only (:func:`_pruned_nearest_centroids`). Runs on the
          device of ``x`` (exhaustive assignments off the CPU), in float64 for float64
          input and float32 otherwise.
        - ``"auto"``: torch. On this package's CPU benchmark (``benchmarks/kmeans_speed.py``,
          BENCHMARKS.md section 5) the torch backend is faster than faiss at ``k = 50`` and
          ``500`` (1.1x to 2.2x on an AVX-512 CPU, 3.3x to 13x on another); faiss remains
          selectable, e.g. to match PCL's runs.

    Warm start (torch backend): when ``N > 2 * warm_start * k``, each restart first runs
    Lloyd (at most ``niter`` iterations) on ``warm_start * k`` random rows, drawn from the
    seeded generator, and then at most ``niter`` iterations on all rows from there. The
    iterations on all rows then start near a fixed point, where few rows change cluster
    and the distance bounds skip most of the work. ``warm_start=None`` means 256 rows per
    cluster; ``0`` turns the warm start off (plain Lloyd from the seeding).

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
        niter: at most this many Lloyd iterations per restart (PCL: 20).
        nredo: restarts.
        seed: seeds the initialisation (both backends).
        backend: ``"auto"``, ``"faiss"`` or ``"torch"``.
        spherical: normalise the centroids during the iterations.
        init: ``"k-means++"``, ``"random"`` or ``None`` (k-means++ for ``k <= 1000``).
        warm_start: rows per cluster of the warm start (torch backend; ``None``: 256,
            ``0``: none). Must stay ``None`` with ``backend="faiss"``.
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
    if warm_start is not None and (
        isinstance(warm_start, bool) or not isinstance(warm_start, int) or warm_start < 0
    ):
        raise ValueError(f"warm_start must be None or an int >= 0, got {warm_start!r}")
    check_finite(x, "x")

    if backend == "auto":
        backend = "torch"
    if backend == "faiss" and warm_start is not None:
        raise ValueError(
            "warm_start applies to the torch backend only; leave it None with backend='faiss'"
        )
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
        assigned = None
    else:
        rows = _WARM_START_ROWS_PER_CLUSTER if warm_start is None else warm_start
        centroids, assigned = _best_restart(
            work,
            k,
            nredo,
            seed,
            spherical,
            init,
            lambda start, generator: _warm_started_lloyd(
                work, start, niter, spherical, verbose, rows, generator
            ),
        )
    if assigned is None:
        indices, sq_dist = nearest_centroids(work, centroids)
        assigned = (indices, float(sq_dist.double().sum()))
    assignments, inertia = assigned
    return ClusterResult(
        centroids=F.normalize(centroids, dim=1).float(),
        assignments=assignments,
        inertia=inertia,
        counts=torch.bincount(assignments, minlength=k),
        raw_centroids=centroids.float(),
    )
