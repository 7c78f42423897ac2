"""`fit` end to end on scikit-learn digits (seconds on a CPU): the run directory it
writes, and the checks that stop a run before it trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tests.engine.runfixtures import digits_config

from anchorlearn.engine.config import parse_config
from anchorlearn.engine.rundir import RunError
from anchorlearn.engine.runner import fit


def test_fit_writes_the_run_directory(tmp_path: Path) -> None:
    cfg = parse_config(digits_config())
    metrics = fit(cfg, tmp_path / "run", quiet=True)
    run = tmp_path / "run"
    for name in ("config.yaml", "class_counts.json", "metrics.json", "checkpoints/last.ckpt"):
        assert (run / name).exists(), name
    assert (run / "logs" / "version_0" / "metrics.csv").exists()
    assert (run / "plots" / "training_curves.png").exists()
    assert (run / "plots" / "tsne.png").stat().st_size > 0
    stored = json.loads((run / "metrics.json").read_text())
    assert stored["top1"] == pytest.approx(metrics["top1"])
    for key in ("top1", "balanced_acc", "many", "medium", "few", "nc1"):
        assert key in stored
    assert 0.0 <= stored["top1"] <= 1.0
    counts = json.loads((run / "class_counts.json").read_text())["train_class_counts"]
    assert max(counts.values()) / min(counts.values()) == pytest.approx(10, rel=0.2)
    assert yaml.safe_load((run / "config.yaml").read_text())["losses"][1]["name"] == "sar"


def test_class_count_mismatch_and_devices_are_checked_before_training(tmp_path: Path) -> None:
    cfg = parse_config(digits_config(model={"name": "small_cnn", "kwargs": {"num_classes": 5}}))
    with pytest.raises(RunError, match="num_classes=5"):
        fit(cfg, tmp_path / "a", quiet=True, plots=False)
    cfg = parse_config(digits_config(trainer={"devices": 4096}))
    with pytest.raises(RunError, match="--devices 4096"):
        fit(cfg, tmp_path / "b", quiet=True, plots=False)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("accelerator", ["auto", "cpu", "gpu", "cuda", "mps"])
def test_too_many_devices_is_refused_for_every_accelerator(accelerator: str) -> None:
    from anchorlearn.engine.runs import check_devices

    # "auto" used to skip the check and start a DDP run that waited for absent processes
    with pytest.raises(RunError, match=r"--devices 4096|no CUDA device|MPS is not available"):
        check_devices(accelerator, 4096)
    if accelerator in ("auto", "cpu"):
        check_devices(accelerator, 1)  # one process is always available


def test_auto_accelerator_error_says_what_auto_picked(monkeypatch) -> None:
    from anchorlearn.engine import runs

    monkeypatch.setattr(runs.torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(runs.torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(RunError, match=r"\(what --accelerator auto picks here\)"):
        runs.check_devices("auto", 4096)
