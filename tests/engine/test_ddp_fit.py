"""`anchorlearn fit --devices 2` on CPU: Lightning DDP with gloo, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPU cores for 2 processes")
def test_two_process_fit_keeps_regularizer_state_identical(tmp_path: Path) -> None:
    config = {
        "name": "ddp",
        "data": {"source": "digits", "imbalance_ratio": 10, "batch_size": 32},
        "model": {"name": "small_cnn", "kwargs": {"width": 8, "feat_dim": 16}},
        "losses": ["ce", {"name": "sar", "update_conf": 0.5}, "ema_prototype"],
        "trainer": {"max_epochs": 2, "progress": False},
    }
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            *(sys.executable, "-m", "anchorlearn.cli", "fit", "--config", str(path)),
            *("--out", str(out), "--devices", "2", "--accelerator", "cpu"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ddp_world_size"] == 2
    # SAR's semantic anchors, gate step, EMA prototypes and the model's BatchNorm
    # statistics (averaged over the ranks at every epoch end) agree bit for bit.
    assert metrics["ddp_max_state_diff"] == 0.0
    assert 0.0 <= metrics["top1"] <= 1.0
