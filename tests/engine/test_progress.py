"""What a training run prints: one line per epoch (or per validation) when the output is not
a terminal, the progress bar on a terminal, and none of Lightning's tips and known noise."""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.callbacks import TQDMProgressBar
from tests.data.segfixtures import make_camvid

from anchorlearn.engine.config import parse_config
from anchorlearn.engine.progress import ProgressLines, quiet_lightning
from anchorlearn.engine.runner import fit
from anchorlearn.engine.runs import make_trainer

NOISE = (
    "Tip",
    "litlogger",
    "GPU available",
    "TPU available",
    "does not have many workers",
    "smaller than the logging interval",
    "LeafSpec",
    "Trainer.fit` stopped",
)


def digits_config(**trainer) -> dict:
    return {
        "name": "digits",
        "task": "classification",
        "data": {"source": "digits", "imbalance_ratio": 10, "batch_size": 64},
        "model": {"name": "small_cnn", "kwargs": {"width": 8, "feat_dim": 16}},
        "losses": ["ce", {"name": "sar", "update_conf": 0.5}],
        "optim": {"lr": 0.05},
        "trainer": {"max_epochs": 2, **trainer},
    }


def fields(line: str) -> dict[str, str]:
    """``key=value`` pairs of one progress line."""
    return dict(part.split("=", 1) for part in line.split())


def csv_rows(run: Path) -> list[dict[str, str]]:
    with (run / "logs" / "version_0" / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


def gate_token(metrics: dict) -> str:
    step = metrics["sar_gate_open_step"]
    return "shut" if step < 0 else f"open@{step}"


def assert_readable(text: str) -> None:
    assert "\r" not in text
    assert "\x1b[" not in text, "ANSI escape codes in the output"
    for noise in NOISE:
        assert noise not in text, noise


def check_epoch_lines(lines: list[str], run: Path, epochs: int) -> None:
    """Each line holds the epoch, the step, the epoch means of the training loss and
    accuracy and the validation accuracy that Lightning logged, and the time."""
    assert len(lines) == epochs
    rows = csv_rows(run)
    for epoch, line in enumerate(lines):
        values = fields(line)
        assert values["epoch"] == f"{epoch + 1}/{epochs}"
        train = next(r for r in rows if r["epoch"] == str(epoch) and r["train/loss_epoch"])
        val = next(r for r in rows if r["epoch"] == str(epoch) and r["val/acc"])
        assert float(values["train/loss"]) == pytest.approx(float(train["train/loss_epoch"]), 1e-3)
        assert float(values["train/acc"]) == pytest.approx(float(train["train/acc_epoch"]), 1e-3)
        assert float(values["val/acc"]) == pytest.approx(float(val["val/acc"]), rel=1e-3)
        # the CSV logs epoch means at the last step of the epoch, the line the steps done
        assert int(values["step"]) == int(train["step"]) + 1
        assert re.fullmatch(r"\d+(\.\d)?s|\d+m\d\ds", values["time"])
        assert math.isfinite(float(values["train/sar/pull"]))


def test_a_fit_piped_to_a_file_prints_one_plain_line_per_epoch(tmp_path: Path) -> None:
    config = tmp_path / "digits.yaml"
    config.write_text(yaml.safe_dump(digits_config()))
    run = tmp_path / "run"
    command = ["fit", "--config", str(config), "--out", str(run), "--no-plots"]
    result = subprocess.run(
        [sys.executable, "-m", "anchorlearn", *command], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert_readable(result.stdout + result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.startswith("epoch=")]
    check_epoch_lines(lines, run, epochs=2)
    metrics = json.loads((run / "metrics.json").read_text())
    assert fields(lines[-1])["sar_gate"] == gate_token(metrics)


def test_without_a_bar_lines_are_printed_and_lightning_noise_is_not(
    tmp_path: Path, capfd, recwarn
) -> None:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    for log in loggers:
        log.addHandler(handler)
    try:
        fit(parse_config(digits_config(max_epochs=1, progress=False)), tmp_path, plots=False)
    finally:
        for log in loggers:
            log.removeHandler(handler)
    out, err = capfd.readouterr()
    assert_readable(out + err)
    check_epoch_lines([x for x in err.splitlines() if x.startswith("epoch=")], tmp_path, 1)
    assert [r.getMessage() for r in records if r.levelno < logging.WARNING] == []
    noise = [str(w.message) for w in recwarn if any(n in str(w.message) for n in NOISE)]
    assert noise == []


@pytest.mark.parametrize(("max_steps", "expected"), [(6, ["3/6", "6/6"]), (4, ["3/4", "4/4"])])
def test_an_iteration_based_run_prints_one_line_per_validation(
    tmp_path: Path, capfd, max_steps: int, expected: list[str]
) -> None:
    root = make_camvid(tmp_path / "data")
    raw = {
        "name": "seg",
        "task": "segmentation",
        "data": {"source": f"camvid:{root}", "crop_size": [32, 48], "batch_size": 2},
        "model": {"name": "seg_net", "kwargs": {"width": 4, "feat_dim": 8}},
        "losses": ["ce", {"name": "sar", "update_conf": 0.3}],
        "optim": {"name": "adamw", "lr": 0.003, "schedule": "poly", "warmup_steps": 2},
        "trainer": {"max_steps": max_steps, "val_every_n_steps": 3},
        "inference": {"batch_size": 2},
    }
    metrics = fit(parse_config(raw), tmp_path / "run", plots=False)
    out, err = capfd.readouterr()
    assert_readable(out + err)
    lines = [fields(line) for line in err.splitlines() if line.startswith("step=")]
    assert [line["step"] for line in lines] == expected
    rows = [r for r in csv_rows(tmp_path / "run") if r["val/miou"]]
    for line, row in zip(lines, rows, strict=False):
        assert float(line["val/miou"]) == pytest.approx(float(row["val/miou"]), rel=1e-3)
    # 6 steps: validated at steps 3 and 6; 4 steps: the last line has no validation
    assert len(rows) == (2 if max_steps == 6 else 1)
    assert ("val/miou" in lines[-1]) == (max_steps == 6)
    assert all(math.isfinite(float(line["train/loss"])) for line in lines)
    assert lines[-1]["sar_gate"] == gate_token(metrics)


class _Terminal:
    """A stream that says it is a terminal."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def isatty(self) -> bool:
        return True

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def _kinds(trainer) -> set[type]:
    return {type(cb) for cb in trainer.callbacks}


def test_the_bar_is_kept_on_a_terminal_and_lines_replace_it_elsewhere(tmp_path, monkeypatch):
    t = parse_config(digits_config()).trainer
    piped = make_trainer(t, tmp_path, [], quiet=False)
    assert ProgressLines in _kinds(piped) and TQDMProgressBar not in _kinds(piped)
    monkeypatch.setattr(sys, "stdout", _Terminal(sys.stdout))
    monkeypatch.setattr(sys, "stderr", _Terminal(sys.stderr))
    terminal = make_trainer(t, tmp_path, [], quiet=False)
    assert TQDMProgressBar in _kinds(terminal) and ProgressLines not in _kinds(terminal)
    t.progress = False  # no bar asked for: lines even on a terminal
    assert ProgressLines in _kinds(make_trainer(t, tmp_path, [], quiet=False))
    quiet = make_trainer(t, tmp_path, [], quiet=True)
    assert not _kinds(quiet) & {TQDMProgressBar, ProgressLines}


def test_lightning_noise_is_silenced_inside_the_context_only() -> None:
    log = logging.getLogger("lightning.pytorch")
    assert log.isEnabledFor(logging.INFO)  # importing the package changes nothing
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_lightning():
            assert not log.isEnabledFor(logging.INFO)
            assert not logging.getLogger("lightning.fabric").isEnabledFor(logging.INFO)
            assert log.isEnabledFor(logging.WARNING)
            warnings.warn(
                "The 'train_dataloader' does not have many workers which may be a bottleneck.",
                UserWarning,
                stacklevel=1,
            )
            warnings.warn("something the user must see", UserWarning, stacklevel=1)
        warnings.warn(
            "The 'val_dataloader' does not have many workers which may be a bottleneck.",
            UserWarning,
            stacklevel=1,
        )
    assert log.isEnabledFor(logging.INFO)
    assert [str(w.message)[:14] for w in seen] == ["something the ", "The 'val_datal"]
