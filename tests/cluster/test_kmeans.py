"""kmeans on both backends: planted clusters, agreement with scikit-learn, errors."""

from __future__ import annotations

import importlib
import importlib.util

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from anchorlearn.cluster import ClusterResult, kmeans

KMEANS_MODULE = importlib.import_module("anchorlearn.cluster.kmeans")
needs_faiss = pytest.mark.skipif(
    importlib.util.find_spec("faiss") is None, reason="faiss not installed"
)
BACKENDS = ["torch", pytest.param("faiss", marks=needs_faiss)]
K, D, PER = 6, 16, 80


def planted(seed: int = 0, spread: float = 0.3) -> tuple[torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(K, D, generator=g) * 3.0
    labels = torch.arange(K).repeat_interleave(PER)
    x = centres[labels] + spread * torch.randn(K * PER, D, generator=g)
    return x, labels.numpy()


@pytest.mark.parametrize(
    ("backend", "init", "nredo"),
    [
        ("torch", "k-means++", 1),
        ("torch", "random", 10),
        pytest.param("faiss", "k-means++", 1, marks=needs_faiss),
        pytest.param("faiss", "random", 10, marks=needs_faiss),
    ],
)
def test_recovers_planted_clusters_and_matches_sklearn(backend: str, init: str, nredo: int) -> None:
    x, truth = planted()
    result = kmeans(x, K, backend=backend, init=init, nredo=nredo, seed=1)  # type: ignore[arg-type]
    assert isinstance(result, ClusterResult)
    assert adjusted_rand_score(truth, result.assignments.numpy()) > 0.99
    reference = KMeans(K, n_init=3, random_state=0).fit(x.numpy())
    assert result.inertia == pytest.approx(reference.inertia_, rel=1e-3)
    means = torch.stack([x[result.assignments == c].mean(0) for c in range(K)])
    recomputed = ((x - means[result.assignments]) ** 2).sum()
    assert float(recomputed) == pytest.approx(result.inertia, rel=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_result_shapes_and_types(backend: str) -> None:
    x, _ = planted()
    result = kmeans(x.double(), K, backend=backend, niter=5)
    assert result.centroids.shape == (K, D) and result.centroids.dtype == torch.float32
    torch.testing.assert_close(result.centroids.norm(dim=1), torch.ones(K))
    assert result.assignments.shape == (K * PER,) and result.assignments.dtype == torch.long
    assert result.counts.dtype == torch.long and int(result.counts.sum()) == K * PER
    assert torch.equal(result.counts, torch.bincount(result.assignments, minlength=K))
    assert isinstance(result.inertia, float) and result.inertia > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_raw_centroids_are_the_cluster_means_the_result_refers_to(backend: str) -> None:
    x, _ = planted()
    x = x + 5.0  # means far from unit norm, so raw and normalised centroids differ
    result = kmeans(x, K, backend=backend, niter=10)
    raw = result.raw_centroids
    assert raw.shape == (K, D) and raw.dtype == torch.float32
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=1), result.centroids)
    means = torch.zeros(K, D).index_add_(0, result.assignments, x) / result.counts[:, None]
    torch.testing.assert_close(raw, means, rtol=1e-4, atol=1e-4)
    sq_dist = torch.cdist(x, raw).square()
    assert torch.equal(result.assignments, sq_dist.argmin(dim=1))
    assert float(sq_dist.min(dim=1).values.sum()) == pytest.approx(result.inertia, rel=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_result(backend: str) -> None:
    x, _ = planted(spread=2.0)
    a = kmeans(x, 10, backend=backend, niter=5, seed=3)
    b = kmeans(x, 10, backend=backend, niter=5, seed=3)
    assert torch.equal(a.assignments, b.assignments)
    assert a.inertia == b.inertia


@pytest.mark.parametrize("backend", BACKENDS)
def test_spherical_on_normalised_data(backend: str) -> None:
    x, truth = planted()
    x = torch.nn.functional.normalize(x, dim=1)
    result = kmeans(x, K, backend=backend, spherical=True, init="k-means++")
    assert adjusted_rand_score(truth, result.assignments.numpy()) > 0.99


def test_more_restarts_never_worse() -> None:
    x, _ = planted(spread=2.5)
    one = kmeans(x, 12, backend="torch", niter=5, nredo=1, seed=4, init="random")
    three = kmeans(x, 12, backend="torch", niter=5, nredo=3, seed=4, init="random")
    assert three.inertia <= one.inertia


@pytest.mark.parametrize("seed", range(5))
def test_torch_reseeds_empty_clusters(seed: int) -> None:
    distinct = torch.randn(8, 3) * 5
    x = distinct.repeat_interleave(30, dim=0)  # random init often picks duplicate rows
    result = kmeans(x, 8, backend="torch", init="random", niter=10, seed=seed)
    assert result.inertia < 1e-2  # float32 round-off of the distance expansion
    assert bool((result.counts == 30).all())


def test_k_equal_n_and_numpy_input() -> None:
    x = np.random.default_rng(0).normal(size=(7, 4)).astype(np.float32)
    result = kmeans(x, 7, backend="torch")
    assert result.inertia == pytest.approx(0.0, abs=1e-5)
    assert sorted(result.assignments.tolist()) == list(range(7))


def test_auto_backend_is_torch_and_faiss_is_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    x, truth = planted()
    monkeypatch.setattr(KMEANS_MODULE, "_faiss_available", lambda: False)
    result = kmeans(x, K)
    assert adjusted_rand_score(truth, result.assignments.numpy()) > 0.99
    assert torch.equal(result.assignments, kmeans(x, K, backend="torch").assignments)
    with pytest.raises(ImportError, match="backend='faiss' needs faiss"):
        kmeans(x, K, backend="faiss")


def test_bad_input_raises() -> None:
    x, _ = planted()
    with pytest.raises(ValueError, match="k must be <= the number of points N=480, got k=481"):
        kmeans(x, 481)
    with pytest.raises(ValueError, match="k must be >= 1"):
        kmeans(x, 0)
    with pytest.raises(TypeError, match="k must be an int"):
        kmeans(x, 2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="x must be 2-D"):
        kmeans(x[None], 3)
    bad = x.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="x must be finite"):
        kmeans(bad, 3)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        kmeans(x.long(), 3)
    with pytest.raises(ValueError, match="backend must be one of"):
        kmeans(x, 3, backend="sklearn")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="niter must be >= 1"):
        kmeans(x, 3, niter=0)


@pytest.mark.parametrize("seed", range(5))
def test_greedy_kmeanspp_seeds_one_point_per_planted_cluster(seed: int) -> None:
    # 24 clusters of 100 points: N = 2400 > 40 k = 960, so the seeding works on a subset.
    g = torch.Generator().manual_seed(100 + seed)
    k, per = 24, 100
    centres = torch.randn(k, D, generator=g) * 4.0
    labels = torch.arange(k).repeat_interleave(per)
    x = centres[labels] + 0.2 * torch.randn(k * per, D, generator=g)
    seeds = KMEANS_MODULE._init_centroids(x, k, "k-means++", torch.Generator().manual_seed(seed))
    nearest_centre = torch.cdist(seeds, centres).argmin(dim=1)
    assert sorted(nearest_centre.tolist()) == list(range(k))
    # the rows are data points, not averages
    assert bool((seeds[:, None, :] == x[None, :, :]).all(dim=2).any(dim=1).all())


def test_default_seeding_switches_to_random_rows_for_large_k(monkeypatch) -> None:
    seen: list[str] = []
    original = KMEANS_MODULE._init_centroids

    def spy(x, k, init, generator):
        seen.append(init)
        return original(x, k, init, generator)

    monkeypatch.setattr(KMEANS_MODULE, "_init_centroids", spy)
    monkeypatch.setattr(KMEANS_MODULE, "_KMEANS_PP_MAX_K", 5)
    x, _ = planted()
    kmeans(x, 5, backend="torch", niter=1)
    kmeans(x, 6, backend="torch", niter=1)
    assert seen == ["k-means++", "random"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 7])
def test_nearest_centroids_matches_brute_force_across_blocks(monkeypatch, dtype, k):
    # blocks of 3 rows or fewer, so that 50 rows cross many block boundaries
    monkeypatch.setattr(KMEANS_MODULE, "_CPU_BLOCK_ELEMENTS", 3 * k)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(50, 5, generator=g) * 4 + 10).to(dtype)  # far from 0: round-off matters
    centroids = x[torch.randperm(50, generator=g)[:k]] + 0.1
    indices, sq_dist = KMEANS_MODULE.nearest_centroids(x, centroids)
    brute = torch.cdist(x.double(), centroids.double()).pow(2)
    assert indices.dtype == torch.long and sq_dist.dtype == dtype
    assert torch.equal(indices, brute.argmin(dim=1))
    tol = 1e-3 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(sq_dist.double(), brute.min(dim=1).values, rtol=0, atol=tol)
    assert (sq_dist >= 0).all()


def _moved_centroids(
    x: torch.Tensor, k: int, move: float, g: torch.Generator, old: torch.Tensor | None = None
):
    """Centroids (``k`` random rows unless given) moved as by a Lloyd update, the rows'
    nearest centroid before the move and the bound on the distance to it after the move."""
    if old is None:
        old = x[torch.randperm(x.shape[0], generator=g)[:k]].clone()
    assign, sq_dist = KMEANS_MODULE.nearest_centroids(x, old)
    new = old + move * torch.randn(old.shape, generator=g, dtype=x.dtype)
    new[1] = new[0]  # a duplicate centroid
    new[-1] += 100.0  # a centroid that jumped far (as a re-seeded empty cluster may)
    x_sq = (x * x).sum(dim=1)
    upper = KMEANS_MODULE._distance_bound(sq_dist, x_sq, old, new, assign)
    return new, assign, upper, x_sq


@pytest.mark.parametrize("move", [0.05, 5.0])
def test_distance_bound_holds_after_the_centroids_move(move: float) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 16, generator=g) + 20  # far from 0: round-off matters
    new, assign, upper, _ = _moved_centroids(x, 50, move, g)
    true = (x.double() - new.double()[assign]).norm(dim=1)
    assert (upper.double() >= true).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("data", ["offset mixture", "unit sphere"])
@pytest.mark.parametrize("share", [0.25, 0.02])  # 0.02: many rows compared with all
def test_pruned_assignment_finds_the_nearest_centroid(monkeypatch, dtype, data, share) -> None:
    monkeypatch.setattr(KMEANS_MODULE, "_PRUNE_MAX_CANDIDATES", share)
    g = torch.Generator().manual_seed(0)
    n, d, k = 3000, 24, 150
    if data == "offset mixture":  # far from 0: the round-off of the expanded distances matters
        centres = torch.randn(30, d, generator=g, dtype=dtype) * 3 + 50
        x = centres[torch.randint(30, (n,), generator=g)]
        x = x + torch.randn(n, d, generator=g, dtype=dtype)
    else:
        x = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    new, assign, upper, x_sq = _moved_centroids(x, k, 0.05, g)
    x_padded = torch.cat([x, x.new_zeros(1, d)])
    indices, sq_dist = KMEANS_MODULE._pruned_nearest_centroids(x_padded, x_sq, new, assign, upper)
    exact = torch.cdist(x.double(), new.double()).pow(2)
    chosen = exact.gather(1, indices[:, None]).squeeze(1)
    # the round-off of the expanded squared distances, which the exhaustive search has too
    scale = float(x_sq.max() + (new * new).sum(dim=1).max())
    tol = scale * (1e-6 if dtype == torch.float32 else 1e-13)
    torch.testing.assert_close(chosen, exact.min(dim=1).values, rtol=0, atol=tol)
    torch.testing.assert_close(sq_dist.double(), chosen, rtol=0, atol=tol)
    assert sq_dist.dtype == dtype and (sq_dist >= 0).all()
    # beyond near-ties the same centroid as the exhaustive search
    assert (indices == exact.argmin(dim=1)).float().mean() > 0.99


def test_pruned_assignment_with_one_dominant_cluster(monkeypatch) -> None:
    # groups capped at 200 padded rows: the large cluster is a group of its own
    monkeypatch.setattr(KMEANS_MODULE, "_PRUNE_GROUP_ROWS", 200)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3000, 8, generator=g)
    x[:2400] = 0.01 * x[:2400] + 5.0  # 80 % of the rows in one tight blob, one centroid there
    old = torch.cat([x[2400:2402], torch.full((1, 8), 5.0), x[2402:2549]])
    new, assign, upper, x_sq = _moved_centroids(x, 150, 0.01, g, old)
    assert int(torch.bincount(assign).max()) > 200
    x_padded = torch.cat([x, x.new_zeros(1, 8)])
    indices, sq_dist = KMEANS_MODULE._pruned_nearest_centroids(x_padded, x_sq, new, assign, upper)
    exact = torch.cdist(x.double(), new.double()).pow(2)
    chosen = exact.gather(1, indices[:, None]).squeeze(1)
    torch.testing.assert_close(chosen, exact.min(dim=1).values, rtol=0, atol=1e-4)
    torch.testing.assert_close(sq_dist.double(), chosen, rtol=0, atol=1e-4)


@pytest.mark.parametrize("spherical", [False, True])
def test_pruned_lloyd_gives_the_same_clustering(monkeypatch, spherical: bool) -> None:
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(40, 32, generator=g) * 2
    x = centres[torch.randint(40, (4000,), generator=g)] + torch.randn(4000, 32, generator=g)
    if spherical:
        x = torch.nn.functional.normalize(x, dim=1)
    results = []
    for min_k in (10**9, 1):  # exhaustive, then pruned assignments
        monkeypatch.setattr(KMEANS_MODULE, "_PRUNE_MIN_K", min_k)
        monkeypatch.setattr(KMEANS_MODULE, "_BOUNDS_MAX_ELEMENTS", 0)
        results.append(kmeans(x, 200, niter=15, seed=3, backend="torch", spherical=spherical))
    full, pruned = results
    assert torch.equal(full.assignments, pruned.assignments)
    torch.testing.assert_close(full.raw_centroids, pruned.raw_centroids, rtol=0, atol=1e-5)
    assert full.inertia == pytest.approx(pruned.inertia, rel=1e-6)


def test_torch_lloyd_stops_at_a_fixed_point(capsys) -> None:
    x, labels = planted(spread=0.05)
    result = kmeans(x, K, niter=50, backend="torch", verbose=True)
    iterations = capsys.readouterr().out.count("kmeans iteration")
    assert 1 <= iterations < 50
    assert adjusted_rand_score(labels, result.assignments.numpy()) == 1.0
    # one more update from the fixed point changes nothing
    again = kmeans(x, K, niter=iterations + 1, backend="torch")
    assert torch.equal(again.raw_centroids, result.raw_centroids)


def _plain_and_bounded(monkeypatch, x: torch.Tensor, k: int, **options):
    """kmeans with exhaustive assignments, then with distance bounds (no warm start)."""
    results = []
    for elements in (0, 1 << 25):
        monkeypatch.setattr(KMEANS_MODULE, "_BOUNDS_MAX_ELEMENTS", elements)
        results.append(kmeans(x, k, backend="torch", warm_start=0, **options))
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spherical", [False, True])
def test_bounded_lloyd_gives_the_same_clustering(monkeypatch, dtype, spherical: bool) -> None:
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(40, 32, generator=g, dtype=dtype) * 2 + 30  # far from 0: round-off
    x = centres[torch.randint(40, (4000,), generator=g)]
    x = x + torch.randn(4000, 32, generator=g, dtype=dtype)
    if spherical:
        x = torch.nn.functional.normalize(x, dim=1)
    full, bounded = _plain_and_bounded(monkeypatch, x, 25, niter=30, seed=3, spherical=spherical)
    assert torch.equal(full.assignments, bounded.assignments)
    # the same means up to float32 round-off (the bounded sums are kept in float64)
    torch.testing.assert_close(full.raw_centroids, bounded.raw_centroids, rtol=1e-5, atol=1e-6)
    # the inertia from the float64 cluster sums, against the distances recomputed
    recomputed = (x.double() - bounded.raw_centroids.double()[bounded.assignments]).pow(2).sum()
    assert bounded.inertia == pytest.approx(float(recomputed), rel=1e-9)
    # the exhaustive path sums float32 expanded distances: round-off of |x|^2 relative
    assert full.inertia == pytest.approx(bounded.inertia, rel=1e-4)


def test_bounded_lloyd_skips_rows_and_reaches_the_fixed_point(capsys) -> None:
    x, _ = planted(spread=1.0)
    result = kmeans(x, K, niter=50, backend="torch", init="random", seed=2, verbose=True)
    lines = [line for line in capsys.readouterr().out.splitlines() if "iteration" in line]
    compared = [int(line.split(" of ")[0].rsplit(" ", 1)[1]) for line in lines]
    assert len(lines) < 50 and lines[-1].endswith(" 0 changed cluster")
    assert min(compared) < K * PER // 2  # later steps compare few rows with every centroid
    sq_dist = torch.cdist(x.double(), result.raw_centroids.double()).square()
    assert torch.equal(result.assignments, sq_dist.argmin(dim=1))


def test_warm_start_runs_on_a_subsample_first(capsys) -> None:
    x, labels = planted()  # 480 rows
    result = kmeans(x, K, backend="torch", warm_start=20, verbose=True)
    out = capsys.readouterr().out
    assert "kmeans warm start on 120 random rows of 480" in out
    assert out.index("warm start") < out.index("kmeans on all 480 rows")
    assert adjusted_rand_score(labels, result.assignments.numpy()) == 1.0
    kmeans(x, K, backend="torch", warm_start=40, verbose=True)  # 2 * 240 rows: not more than N
    kmeans(x, K, backend="torch", verbose=True)  # default 256 per cluster
    assert "warm start" not in capsys.readouterr().out
    plain = kmeans(x, K, backend="torch", warm_start=0)
    assert plain.inertia == pytest.approx(result.inertia, rel=1e-4)  # the same optimum


@pytest.mark.parametrize("bad", [-1, 1.5, True, "256"])
def test_bad_warm_start_raises(bad) -> None:
    x, _ = planted()
    with pytest.raises(ValueError, match="warm_start must be None or an int >= 0"):
        kmeans(x, K, warm_start=bad)


@needs_faiss
def test_warm_start_is_for_the_torch_backend() -> None:
    x, _ = planted()
    with pytest.raises(ValueError, match="warm_start applies to the torch backend only"):
        kmeans(x, K, backend="faiss", warm_start=10)
