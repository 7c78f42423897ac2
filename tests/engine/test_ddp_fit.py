"""`anchorlearn fit --devices 2` on CPU: Lightning DDP with gloo, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

# Lightning's warning for an epoch-level value logged without sync_dist under DDP
SYNC_DIST_WARNING = "sync_dist=True)` when logging on epoch level"


def fit_in_two_processes(config: dict, tmp_path: Path, *flags: str) -> tuple[Path, str]:
    """``anchorlearn fit --devices 2`` on the CPU in a fresh process; the run directory and
    what the run wrote to stderr."""
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    result = subprocess.run(
        [
            *(sys.executable, "-m", "anchorlearn.cli", "fit", "--config", str(path)),
            *("--out", str(out), "--devices", "2", "--accelerator", "cpu", *flags),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stderr


def logged_column(run_dir: Path, column: str) -> list[float]:
    """The non-empty values of ``column`` in the run's CSV log, in order."""
    rows = (run_dir / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    values = [row.split(",")[header.index(column)] for row in rows[1:]]
    return [float(v) for v in values if v]


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPU cores for 2 processes")
def test_two_process_fit_keeps_regularizer_state_identical(tmp_path: Path) -> None:
    from anchorlearn.engine.runner import evaluate_checkpoint

    config = {
        "name": "ddp",
        # 61 validation images: an odd number, which a distributed sampler pads with a repeat
        "data": {"source": "digits", "imbalance_ratio": 10, "batch_size": 32},
        "model": {"name": "small_cnn", "kwargs": {"width": 8, "feat_dim": 16}},
        # a low gate threshold and a strong auxiliary CE open SAR's gate within a few steps
        "losses": [
            "ce",
            {"name": "sar", "update_conf": 0.3, "aux_weight": 5.0},
            "ema_prototype",
        ],
        "trainer": {"max_epochs": 2, "progress": False},
    }
    config["data"]["val_fraction"] = 0.11
    out, stderr = fit_in_two_processes(config, tmp_path, "--no-plots")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ddp_world_size"] == 2
    # The gate opened, so the semantic anchors compared below are not the zeros they start as.
    assert 0 <= metrics["sar_gate_open_step"] < metrics["sar_steps"]
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    (anchors,) = (v for k, v in state.items() if k.endswith("semantic_anchors"))
    assert bool((anchors.abs().sum(dim=1) > 0).all())
    # SAR's semantic anchors, gate step, EMA prototypes and the model's BatchNorm
    # statistics (averaged over the ranks at every epoch end) agree bit for bit.
    assert metrics["ddp_max_state_diff"] == 0.0
    assert 0.0 <= metrics["top1"] <= 1.0
    # Validation on the two shards counts every image once: the accuracy of the whole split,
    # logged with every epoch-level value reduced over the ranks (no Lightning warning; the
    # in-process test below sees that warning whatever filters the command line installs).
    whole = evaluate_checkpoint(out / "checkpoints" / "last.ckpt", split="val")
    assert logged_column(out, "val/acc")[-1] == pytest.approx(whole["top1"], abs=1e-6)
    assert SYNC_DIST_WARNING not in stderr


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPU cores for 2 processes")
def test_two_process_segmentation_by_steps_validates_on_shards_and_agrees(tmp_path: Path) -> None:
    from tests.data.segfixtures import make_camvid

    from anchorlearn.engine.runner import evaluate_checkpoint

    config = {
        "name": "ddp_seg",
        "task": "segmentation",
        "data": {"source": f"camvid:{make_camvid(tmp_path)}", "crop_size": [32, 48]},
        "model": {"name": "seg_net", "kwargs": {"width": 4, "feat_dim": 8}},
        "losses": ["ce", {"name": "sar", "update_conf": 0.3}],
        "optim": {"name": "adamw", "lr": 0.003, "schedule": "poly"},
        "trainer": {"max_steps": 4, "val_every_n_steps": 4, "progress": False},
        "inference": {"batch_size": 2},
    }
    config["data"]["batch_size"] = 2
    out, stderr = fit_in_two_processes(config, tmp_path, "--no-plots")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ddp_world_size"] == 2 and metrics["steps"] == 4
    assert metrics["ddp_max_state_diff"] == 0.0
    # validation on the two shards, confusion matrices summed: the score of the whole split
    whole = evaluate_checkpoint(out / "checkpoints" / "last.ckpt", split="val")
    for key in ("miou", "aacc", "macc"):
        assert logged_column(out, f"val/{key}")[-1] == pytest.approx(whole[key], abs=1e-6)
    assert SYNC_DIST_WARNING not in stderr


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_epoch_level_logs_reduce_over_ranks_without_lightning_warning(
    task: str, tmp_path: Path
) -> None:
    """Lightning warns about every epoch-level value logged without ``sync_dist`` in a
    distributed run. A one-process DDP run (its gloo group set up here) is one, in this
    process, where the warning is seen whatever filters the command line installs."""
    import lightning as L
    import torch.distributed as dist
    from lightning.pytorch.strategies import DDPStrategy
    from lightning.pytorch.trainer.connectors.logger_connector import result

    from anchorlearn.engine.config import parse_config
    from anchorlearn.engine.runner import build_run

    if task == "classification":
        config = {
            "data": {"source": "digits", "batch_size": 32, "max_train_samples": 96},
            "model": {"name": "small_cnn", "kwargs": {"width": 4, "feat_dim": 8}},
            "losses": ["ce", "sar"],
            "trainer": {"max_epochs": 1},
        }
        schedule: dict = {"max_epochs": 1}
    else:
        from tests.data.segfixtures import make_camvid

        config = {
            "task": "segmentation",
            "data": {"source": f"camvid:{make_camvid(tmp_path)}", "crop_size": [32, 48]},
            "model": {"name": "seg_net", "kwargs": {"width": 4, "feat_dim": 8}},
            "losses": ["ce", "sar"],
            "trainer": {"max_steps": 2, "val_every_n_steps": 2},
        }
        config["data"]["batch_size"] = 2
        schedule = {
            "max_steps": 2,
            "max_epochs": -1,
            "val_check_interval": 2,
            "check_val_every_n_epoch": None,
            "use_distributed_sampler": False,
        }
    dm, module = build_run(parse_config(config))
    trainer = L.Trainer(
        **schedule,
        accelerator="cpu",
        devices=1,
        strategy=DDPStrategy(broadcast_buffers=False),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        result.warning_cache.clear()  # a message Lightning warned about before stays silent
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module, datamodule=dm)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    unsynced = [str(w.message) for w in caught if SYNC_DIST_WARNING in str(w.message)]
    assert unsynced == []
    logged = trainer.callback_metrics
    assert {"train/loss", "val/acc" if task == "classification" else "val/miou"} <= set(logged)
