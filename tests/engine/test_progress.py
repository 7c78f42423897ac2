"""What a training run prints: one line per epoch (or per validation) when the output is not
a terminal, the progress bar on a terminal, and none of Lightning's tips and known noise."""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import yaml
from lightning.pytorch.callbacks import TQDMProgressBar
from tests.data.segfixtures import make_camvid
from tests.engine import runfixtures

from anchorlearn.engine.config import OptimConfig, parse_config
from anchorlearn.engine.module import lr_factor
from anchorlearn.engine.progress import InterruptNotice, ProgressLines, quiet_lightning
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
    """The shared digits config with its trainer section replaced by two epochs and
    ``trainer`` (the progress setting left at its default unless given)."""
    return runfixtures.digits_config(trainer={"max_epochs": 2, **trainer})


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


def epoch_lines(err: str) -> list[str]:
    """The end-of-epoch lines of an epoch-based run (not the lines within an epoch)."""
    return [x for x in err.splitlines() if x.startswith("epoch=") and "batch" not in fields(x)]


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
    lines = epoch_lines(result.stderr)
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
    check_epoch_lines(epoch_lines(err), tmp_path, 1)
    assert [r.getMessage() for r in records if r.levelno < logging.WARNING] == []
    noise = [str(w.message) for w in recwarn if any(n in str(w.message) for n in NOISE)]
    assert noise == []


def camvid_config(root: Path, **trainer) -> dict:
    return {
        "name": "seg",
        "task": "segmentation",
        "data": {"source": f"camvid:{root}", "crop_size": [32, 48], "batch_size": 2},
        "model": {"name": "seg_net", "kwargs": {"width": 4, "feat_dim": 8}},
        "losses": ["ce", {"name": "sar", "update_conf": 0.3}],
        "optim": {"name": "adamw", "lr": 0.003, "schedule": "poly", "warmup_steps": 2},
        "trainer": trainer,
        "inference": {"batch_size": 2},
    }


class StepRecorder(L.Callback):
    """The training loss and the batch size of every training batch, in order."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.sizes: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.sizes.append(int(batch[0].shape[0]))


def weighted_mean(values: list[float], weights: list[int]) -> float:
    return sum(v * w for v, w in zip(values, weights, strict=True)) / sum(weights)


@pytest.mark.parametrize(("max_steps", "expected"), [(6, ["3/6", "6/6"]), (4, ["3/4", "4/4"])])
def test_an_iteration_based_run_prints_one_line_per_validation(
    tmp_path: Path, capfd, max_steps: int, expected: list[str]
) -> None:
    root = make_camvid(tmp_path / "data")
    raw = camvid_config(root, max_steps=max_steps, val_every_n_steps=3)
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


def test_an_iteration_based_run_prints_a_line_every_log_every_n_steps(
    tmp_path: Path, capfd
) -> None:
    """No val_every_n_steps: one validation at the end, and a line every 2 steps before it,
    with the running means of the training values since the previous line, the learning
    rate of the last step, the time and an estimate of the time left."""
    root = make_camvid(tmp_path / "data")
    raw = camvid_config(root, max_steps=6, log_every_n_steps=2, progress=False)
    recorder = StepRecorder()
    fit(parse_config(raw), tmp_path / "run", plots=False, callbacks=[recorder])
    out, err = capfd.readouterr()
    assert_readable(out + err)
    lines = [fields(line) for line in err.splitlines() if line.startswith("step=")]
    assert [line["step"] for line in lines] == ["2/6", "4/6", "6/6"]
    assert [("val/miou" in line) for line in lines] == [False, False, True]
    optim = OptimConfig(name="adamw", lr=0.003, schedule="poly", warmup_steps=2)
    for k, line in zip((2, 4, 6), lines, strict=True):
        since_last = slice(k - 2, k)
        expected = weighted_mean(recorder.losses[since_last], recorder.sizes[since_last])
        assert float(line["train/loss"]) == pytest.approx(expected, rel=1e-3)
        assert math.isfinite(float(line["train/ce/ce"]))
        # the rate the k-th step used (the schedule's factor at 0-based step k - 1)
        rate = 0.003 * lr_factor(k - 1, total=6, warmup=2, cfg=optim)
        assert float(line["lr"]) == pytest.approx(rate, rel=1e-3)
        assert re.fullmatch(r"\d+(\.\d)?s|\d+m\d\ds", line["time"])
    assert all(re.fullmatch(r"\d+(\.\d)?s|\d+m\d\ds", line["eta"]) for line in lines[:2])
    assert "eta" not in lines[-1]  # nothing left


@pytest.mark.parametrize(("log_every", "within"), [(3, list(range(3, 31, 3))), (4, [])])
def test_an_epoch_based_run_prints_lines_within_long_epochs_only(
    tmp_path: Path, capfd, log_every: int, within: list[int]
) -> None:
    """32 steps an epoch: lines within it every 3 steps (32 >= 10 x 3), none every 4."""
    raw = digits_config(max_epochs=1, log_every_n_steps=log_every, progress=False)
    raw["data"]["batch_size"] = 16  # 506 training images: 32 steps
    fit(parse_config(raw), tmp_path, plots=False)
    _, err = capfd.readouterr()
    lines = [fields(x) for x in err.splitlines() if x.startswith("epoch=")]
    assert [int(x["step"]) for x in lines] == [*within, 32]
    assert [x.get("batch") for x in lines] == [f"{k}/32" for k in within] + [None]
    assert all(x["epoch"] == "1/1" and "val/acc" not in x for x in lines[:-1])
    assert "val/acc" in lines[-1]


def test_every_value_of_a_line_is_the_same_batch_weighted_mean(tmp_path: Path, capfd) -> None:
    """One CE loss: the total loss and the CE term are the same numbers at every step, so
    their means in a line are too (506 images in batches of 64: the last batch is smaller,
    and a mean over the steps would differ from one over the images)."""
    raw = digits_config(max_epochs=1, progress=False)
    raw["losses"] = ["ce"]
    recorder = StepRecorder()
    fit(parse_config(raw), tmp_path, plots=False, callbacks=[recorder])
    _, err = capfd.readouterr()
    (line,) = [fields(x) for x in epoch_lines(err)]
    assert line["train/loss"] == line["train/ce/ce"]
    assert sorted(set(recorder.sizes)) == [58, 64]
    expected = weighted_mean(recorder.losses, recorder.sizes)
    assert float(line["train/loss"]) == pytest.approx(expected, rel=1e-3)


class Interrupt(L.Callback):
    """Raises KeyboardInterrupt (as Ctrl-C does) after batch ``batch_idx`` of ``epoch``."""

    def __init__(self, epoch: int, batch_idx: int) -> None:
        self.epoch, self.batch_idx = epoch, batch_idx

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch_idx:
            raise KeyboardInterrupt


@pytest.mark.parametrize(
    ("epoch", "batch_idx", "quiet", "tail"),
    [
        # 8 steps an epoch: last.ckpt written at the end of the first
        (1, 2, False, "the last checkpoint is {ckpt} (step 8): continue with --resume"),
        (0, 1, True, "no checkpoint yet ({ckpt} does not exist): --resume starts afresh"),
    ],
)
def test_ctrl_c_prints_where_training_stopped_and_what_to_resume_from(
    tmp_path: Path, capfd, epoch: int, batch_idx: int, quiet: bool, tail: str
) -> None:
    cfg = parse_config(digits_config(progress=False))
    handler = signal.getsignal(signal.SIGINT)  # Lightning ignores SIGINT after a Ctrl-C
    try:
        with pytest.raises(SystemExit):
            fit(cfg, tmp_path, plots=False, quiet=quiet, callbacks=[Interrupt(epoch, batch_idx)])
    finally:
        signal.signal(signal.SIGINT, handler)
    out, err = capfd.readouterr()
    assert_readable(out + err)
    stopped = [x for x in err.splitlines() if x.startswith("interrupted")]
    step = epoch * 8 + batch_idx + 1
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert stopped == [
        f"interrupted at epoch {epoch + 1}/2, step {step}; " + tail.format(ckpt=ckpt)
    ]
    assert "Detected KeyboardInterrupt" not in err


def test_ctrl_c_in_an_iteration_based_run_names_the_step_of_the_checkpoint(
    tmp_path: Path, capfd
) -> None:
    root = make_camvid(tmp_path / "data")
    raw = camvid_config(root, max_steps=6, checkpoint_every_n_steps=2, progress=False)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):
            fit(parse_config(raw), tmp_path / "run", plots=False, callbacks=[Interrupt(0, 2)])
    finally:
        signal.signal(signal.SIGINT, handler)
    _, err = capfd.readouterr()
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    expected = f"interrupted at step 3/6; the last checkpoint is {ckpt} (step 2): continue with"
    assert [x for x in err.splitlines() if x.startswith("interrupted")] == [expected + " --resume"]


def test_an_unreadable_checkpoint_is_named_as_such(tmp_path: Path) -> None:
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"half a checkpoint")
    trainer = SimpleNamespace(global_step=5, max_epochs=3, max_steps=-1, current_epoch=0)
    line = InterruptNotice(ckpt).message(trainer)
    assert line.startswith(f"interrupted at epoch 1/3, step 5; the last checkpoint {ckpt} cannot")
    assert line.endswith("it may be incomplete") and "\n" not in line


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


def test_a_per_class_gate_reports_how_many_classes_opened(tmp_path: Path, capfd) -> None:
    raw = runfixtures.digits_config(
        losses=["ce", {"name": "sar", "update_conf": 0.5, "gate": "per_class"}]
    )
    metrics = fit(parse_config(raw), tmp_path, plots=False)
    _, err = capfd.readouterr()
    opened = metrics["sar_classes_open"]
    assert 0 <= opened <= 10
    all_open = metrics["sar_all_open_step"]
    assert (all_open >= metrics["sar_gate_open_step"] >= 1) if opened == 10 else all_open == -1
    last = fields(epoch_lines(err)[-1])
    assert last["sar_gate"] == f"{gate_token(metrics)}({opened}/10)"


def test_the_plot_note_names_per_class_gates_left_shut() -> None:
    import torch
    from torch import nn

    from anchorlearn.engine.evaluate import regularizer_state, shut_gate_note
    from anchorlearn.engine.objective import Objective
    from anchorlearn.losses import SemanticAnchorRegularizer

    sar = SemanticAnchorRegularizer(4, 8, nn.Linear(8, 4), gate="per_class", seed=0)
    module = SimpleNamespace(objective=Objective(["sar"], [sar], ["features"]))
    assert shut_gate_note(module) == "SAR gate never opened: no semantic anchors"
    sar.class_open_step.copy_(torch.tensor([3, -1, 5, -1]))
    sar.gate_open_step.fill_(3)
    assert shut_gate_note(module) == (
        "SAR gate: 2 of 4 classes never opened: no semantic anchors drawn"
    )
    assert regularizer_state(module)["sar_classes_open"] == 2
    assert regularizer_state(module)["sar_all_open_step"] == -1
    sar.class_open_step.copy_(torch.tensor([3, 9, 5, 4]))
    assert shut_gate_note(module) is None
    assert regularizer_state(module)["sar_all_open_step"] == 9
