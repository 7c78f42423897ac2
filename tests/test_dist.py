"""is_distributed and all_gather_cat without a process group, and in two CPU processes (gloo)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from anchorlearn._dist import all_gather_cat, is_distributed

WORLD_SIZE = 2


def rank_rows(rank: int) -> torch.Tensor:
    """Rows that say which rank they come from: ``(3, 2)``, entries ``10 * rank + i``."""
    return (10.0 * rank + torch.arange(6.0)).reshape(3, 2)


def worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        result = {
            "is_distributed": is_distributed(),
            "gathered": all_gather_cat(rank_rows(rank).t()[:, :2].t()),  # not contiguous
        }
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_without_a_process_group_nothing_is_distributed() -> None:
    assert not dist.is_initialized()
    assert is_distributed() is False


def test_two_ranks_are_distributed_and_gather_in_rank_order(tmp_path: Path) -> None:
    # Spawned children unpickle ``worker`` by its module name; make that name importable
    # there whether or not pytest's own import mode put the root on sys.path.
    package_depth = len(worker.__module__.split("."))
    import_root = Path(__file__).resolve().parents[package_depth - 1]
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(import_root))
        mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    expected = torch.cat([rank_rows(rank)[:2] for rank in range(WORLD_SIZE)])
    for rank in range(WORLD_SIZE):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert result["is_distributed"] is True
        assert torch.equal(result["gathered"], expected)
