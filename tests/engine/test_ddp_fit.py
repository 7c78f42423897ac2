"""`anchorlearn fit --devices 2` on CPU: Lightning DDP with gloo, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


def fit_in_two_processes(config: dict, tmp_path: Path, *flags: str) -> Path:
    """``anchorlearn fit --devices 2`` on the CPU in a fresh process; the run directory."""
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
    return out


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPU cores for 2 processes")
def test_two_process_fit_keeps_regularizer_state_identical(tmp_path: Path) -> None:
    config = {
        "name": "ddp",
        "data": {"source": "digits", "imbalance_ratio": 10, "batch_size": 32},
        "model": {"name": "small_cnn", "kwargs": {"width": 8, "feat_dim": 16}},
        "losses": ["ce", {"name": "sar", "update_conf": 0.5}, "ema_prototype"],
        "trainer": {"max_epochs": 2, "progress": False},
    }
    out = fit_in_two_processes(config, tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ddp_world_size"] == 2
    # SAR's semantic anchors, gate step, EMA prototypes and the model's BatchNorm
    # statistics (averaged over the ranks at every epoch end) agree bit for bit.
    assert metrics["ddp_max_state_diff"] == 0.0
    assert 0.0 <= metrics["top1"] <= 1.0


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
    out = fit_in_two_processes(config, tmp_path, "--no-plots")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ddp_world_size"] == 2 and metrics["steps"] == 4
    assert metrics["ddp_max_state_diff"] == 0.0
    # validation on the two shards, confusion matrices summed: the score of the whole split
    rows = (out / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    logged = [r.split(",")[header.index("val/miou")] for r in rows[1:]]
    logged = [float(v) for v in logged if v]
    whole = evaluate_checkpoint(out / "checkpoints" / "last.ckpt", split="val")
    assert logged[-1] == pytest.approx(whole["miou"], abs=1e-6)
