"""Two CPU processes (gloo): buffers agree across ranks and loss keys never differ.

One process group of world size 2 is spawned once for the module; each rank runs three
training steps of ``EMAPrototypeLoss`` and of ``SemanticAnchorRegularizer`` on its own data
and saves what it saw, which the tests then compare. The EMA prototypes all-reduce their
class statistics; SAR exchanges nothing between ranks, so its test checks that its state
depends only on parameters (which DDP keeps equal), never on a rank's batch. The end-to-end
check, with DDP all-reducing the gradients of real models, is
``tests/engine/test_ddp_fit.py``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from anchorlearn.losses.prototypes import EMAPrototypeLoss

WORLD_SIZE = 2
STEPS = 3
C, D = 4, 6
IGNORE = 255
HAS_SAR = importlib.util.find_spec("anchorlearn.losses.sar") is not None


def rank_batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic, rank-dependent data: different sizes and classes on each rank."""
    generator = torch.Generator().manual_seed(1000 * step + rank)
    n = 5 + 3 * rank
    features = torch.randn(n, D, generator=generator) + 2.0 * rank
    labels = torch.randint(0, C, (n,), generator=generator)
    if rank == 1:
        labels[labels == 3] = 2  # class 3 only ever comes from rank 0
    if rank == 0 and step == 0:
        labels[:] = IGNORE  # an empty local batch must still join the collective update
    return features, labels


def run_sar(rank: int) -> list[dict[str, object]]:
    from anchorlearn.losses.sar import SemanticAnchorRegularizer

    torch.manual_seed(0)
    classifier = torch.nn.Linear(D, C, bias=False)
    sar = SemanticAnchorRegularizer(
        C, D, classifier, projector=torch.nn.Identity(), update_conf=0.5, seed=0
    )
    seen = []
    for step in range(STEPS):
        # Step 0: a zero classifier keeps the gate shut. Then W = 10 (A^+)^T gives anchor
        # logits W A^T = 10 I: every anchor confidently correct, so the gate opens.
        with torch.no_grad():
            solved = 10.0 * torch.linalg.pinv(sar.anchors).T
            classifier.weight.copy_(torch.zeros(C, D) if step == 0 else solved)
        features, labels = rank_batch(rank, step)
        features.requires_grad_(True)
        out = sar(features, labels)
        out["loss"].backward()
        seen.append(
            {
                "keys": sorted(out),
                "gate_open": bool(out["gate_open"]),
                "semantic_anchors": sar.semantic_anchors.clone(),
            }
        )
    return seen


def worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        ema = EMAPrototypeLoss(C, D, momentum=0.6)
        ema_keys = []
        for step in range(STEPS):
            features, labels = rank_batch(rank, step)
            ema_keys.append(sorted(ema(features, labels)))
        result: dict[str, object] = {
            "prototypes": ema.prototypes.clone(),
            "initialized": ema.initialized.clone(),
            "ema_keys": ema_keys,
        }
        if HAS_SAR:
            result["sar"] = run_sar(rank)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("ddp")
    # Spawned children unpickle ``worker`` by its module name; make that name importable
    # there whether or not pytest's own import mode put the root on sys.path.
    package_depth = len(worker.__module__.split("."))
    import_root = Path(__file__).resolve().parents[package_depth - 1]
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(import_root))
        mp.spawn(worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]


def test_ema_prototypes_agree_across_ranks_and_match_single_process(rank_results) -> None:
    single = EMAPrototypeLoss(C, D, momentum=0.6)
    for step in range(STEPS):
        batches = [rank_batch(rank, step) for rank in range(WORLD_SIZE)]
        single(torch.cat([f for f, _ in batches]), torch.cat([y for _, y in batches]))
    rank0, rank1 = rank_results
    assert torch.equal(rank0["prototypes"], rank1["prototypes"])
    assert torch.equal(rank0["initialized"], rank1["initialized"])
    assert rank0["initialized"].all()
    torch.testing.assert_close(rank0["prototypes"], single.prototypes)
    assert rank0["ema_keys"] == rank1["ema_keys"] == [["loss", "pull"]] * STEPS


@pytest.mark.skipif(not HAS_SAR, reason="anchorlearn.losses.sar is not available")
def test_sar_state_follows_the_parameters_not_the_rank_batch(rank_results) -> None:
    # Same parameters, different data on each rank (sizes, classes, an all-ignored batch):
    # the gate and the semantic anchors must not depend on the batch, or ranks would drift.
    rank0, rank1 = (result["sar"] for result in rank_results)
    for step in range(STEPS):
        assert rank0[step]["keys"] == rank1[step]["keys"]
        assert rank0[step]["keys"] == rank0[0]["keys"]
        assert rank0[step]["gate_open"] == rank1[step]["gate_open"]
        assert torch.equal(rank0[step]["semantic_anchors"], rank1[step]["semantic_anchors"])
    assert [s["gate_open"] for s in rank0] == [False, True, True]
    # the anchors compared above are set, not the zeros they start as
    assert not rank0[0]["semantic_anchors"].any()
    assert bool((rank0[-1]["semantic_anchors"].abs().sum(dim=1) > 0).all())
