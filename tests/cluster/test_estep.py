"""PCL's E-step: embedding a rank's shard, clustering it with the concentrations measured
before normalisation, and the DDP gather / broadcast on two gloo processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from anchorlearn.cluster import embed_shard, estimate_concentration, gather_and_cluster, kmeans


def test_shards_of_every_rank_embed_every_sample_once() -> None:
    images = torch.arange(11 * 3, dtype=torch.float32).reshape(11, 3)
    weight = torch.randn(3, 2)
    seen = []
    for rank in range(3):
        features, indices = embed_shard(
            lambda batch: batch @ weight, images, 2, rank=rank, world_size=3, batch_size=2
        )
        assert torch.equal(indices, torch.arange(rank, 11, 3))
        assert features.dtype == torch.float32 and features.shape == (len(indices), 2)
        torch.testing.assert_close(features, images[indices] @ weight)
        seen.append(indices)
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(11))
    # more ranks than samples: an empty shard of the right width
    features, indices = embed_shard(lambda b: b @ weight, images[:2], 2, rank=2, world_size=3)
    assert features.shape == (0, 2) and indices.shape == (0,)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"rank": 3, "world_size": 3}, ValueError, r"rank must be in \[0, world_size=3\), got 3"),
        ({"rank": -1}, ValueError, r"rank must be in \[0, world_size=1\), got -1"),
        ({"rank": 0.0}, TypeError, "rank must be an int, got float"),
        ({"world_size": 0}, ValueError, "world_size must be >= 1, got 0"),
        ({"batch_size": 0}, ValueError, "batch_size must be >= 1, got 0"),
    ],
)
def test_embed_shard_bad_arguments_name_the_argument(kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        embed_shard(lambda b: b, torch.zeros(4, 2), 2, **kwargs)


def test_single_process_estep_matches_its_parts() -> None:
    x = F.normalize(torch.randn(60, 8), dim=1)
    order = torch.randperm(60)
    result = gather_and_cluster(x[order], order, 60, [3, 5], niter=5)
    again = gather_and_cluster(x, torch.arange(60), 60, [3, 5], niter=5)
    for a, b in zip(result.assignments, again.assignments, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="cover 59 of 60"):
        gather_and_cluster(x[:59], torch.arange(59), 60, [3])
    for bad in (torch.arange(1, 61), torch.arange(-1, 59)):  # past the end; negative
        with pytest.raises(ValueError, match=r"indices must lie in \[0, 60\), got 1 value"):
            gather_and_cluster(x, bad, 60, [3])


def test_estep_concentration_is_measured_to_the_centroids_before_normalisation() -> None:
    # unit-norm clusters of different spread: their means have different norms, so the
    # distances to the means and to the normalised means differ by a per-cluster factor
    generator = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(6, 16, generator=generator), dim=1)
    spread = torch.tensor([0.05, 0.1, 0.2, 0.3, 0.5, 0.8]).repeat_interleave(50)
    noise = torch.randn(300, 16, generator=generator)
    x = F.normalize(centres.repeat_interleave(50, dim=0) + spread[:, None] * noise, dim=1)
    result = gather_and_cluster(x, torch.arange(300), 300, [6], temperature=0.2, niter=10)
    clusters = kmeans(x, 6, niter=10, seed=0)
    assert torch.equal(result.assignments[0], clusters.assignments)
    expected = estimate_concentration(x, clusters.raw_centroids, clusters.assignments, 0.2)
    torch.testing.assert_close(result.concentrations[0], expected)
    normalised = estimate_concentration(x, clusters.centroids, clusters.assignments, 0.2)
    assert float((result.concentrations[0] - normalised).abs().max()) > 1e-3


# DDP: two gloo processes each embed half of the data; both must end with the same E-step.

DDP_N, DDP_D, DDP_KS = 90, 8, [4, 7]


def ddp_features() -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    centres = torch.randn(5, DDP_D, generator=generator) * 3
    x = centres[torch.arange(DDP_N) % 5] + torch.randn(DDP_N, DDP_D, generator=generator)
    return F.normalize(x, dim=1)


def ddp_worker(rank: int, init_file: str, out_dir: str, poison: bool = False) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        x = ddp_features()
        # uneven shards: rank 0 gets every third sample, rank 1 the rest
        mine = torch.arange(DDP_N)
        mine = mine[(mine % 3 == 0) == (rank == 0)]
        if rank == 1:
            torch.manual_seed(123)  # a different global RNG state must not matter
        if poison:
            # rank 1 sends a NaN row: k-means fails on rank 0, and every rank must raise
            # rather than wait for a broadcast that never comes
            x[1] = float("nan")
            try:
                gather_and_cluster(x[mine], mine, DDP_N, DDP_KS, niter=10, seed=5)
            except Exception as err:
                (Path(out_dir) / f"rank{rank}.err").write_text(f"{type(err).__name__}: {err}")
            return
        result = gather_and_cluster(x[mine], mine, DDP_N, DDP_KS, niter=10, seed=5)
        torch.save(
            {
                "prototypes": result.prototypes,
                "concentrations": result.concentrations,
                "assignments": result.assignments,
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def spawn_ddp_workers(tmp_path: Path, poison: bool = False) -> None:
    """Run :func:`ddp_worker` on two processes; they import this module by its path."""
    package_depth = len(ddp_worker.__module__.split("."))
    import_root = Path(__file__).resolve().parents[package_depth - 1]
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(import_root))
        args = (str(tmp_path / "init"), str(tmp_path), poison)
        mp.spawn(ddp_worker, args=args, nprocs=2, join=True)


def test_ddp_gather_and_cluster_gives_every_rank_the_same_estep(tmp_path: Path) -> None:
    spawn_ddp_workers(tmp_path)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    single = gather_and_cluster(
        ddp_features(), torch.arange(DDP_N), DDP_N, DDP_KS, niter=10, seed=5
    )
    for g, k in enumerate(DDP_KS):
        assert rank0["prototypes"][g].shape == (k, DDP_D)
        assert rank0["assignments"][g].shape == (DDP_N,)
        for key in ("prototypes", "concentrations", "assignments"):
            assert torch.equal(rank0[key][g], rank1[key][g]), (key, g)
            torch.testing.assert_close(rank0[key][g], getattr(single, key)[g])


def test_ddp_estep_failure_on_rank_0_raises_on_every_rank(tmp_path: Path) -> None:
    spawn_ddp_workers(tmp_path, poison=True)
    root, other = ((tmp_path / f"rank{r}.err").read_text() for r in (0, 1))
    assert root.startswith("ValueError") and "finite" in root
    assert other.startswith("RuntimeError: the E-step failed on rank 0")
