"""Interrupted runs: `last.ckpt` after every epoch, `--resume` to the same result as an
uninterrupted run, and the settings a resumed run may not change."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import pytest
from tests.engine.runfixtures import StopAfter, digits_config

from anchorlearn.engine.config import parse_config
from anchorlearn.engine.rundir import RunError
from anchorlearn.engine.runner import fit


class _Slow(L.Callback):
    """Makes each training epoch last ``seconds`` longer (within the epoch, which the
    training clock times)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            time.sleep(self.seconds)


def test_resume_reaches_the_same_result_as_an_uninterrupted_run(tmp_path: Path) -> None:
    cfg = parse_config(digits_config(trainer={"max_epochs": 3, "progress": False}))
    full = fit(cfg, tmp_path / "full", quiet=True, plots=False)
    slow = _Slow(0.5)
    fit(cfg, tmp_path / "resumed", quiet=True, plots=False, callbacks=[StopAfter(2), slow])
    first = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    resumed = fit(cfg, tmp_path / "resumed", resume=True, quiet=True, plots=False, callbacks=[slow])
    assert resumed["epochs"] == full["epochs"] == 3
    # the training time adds up over the two attempts (kept in the checkpoint): every
    # epoch takes at least 0.5 s, against the 0.1 s to which the metric is rounded
    assert first["train_seconds"] >= 1.0
    assert resumed["train_seconds"] >= first["train_seconds"] + 0.4
    assert resumed["top1"] == pytest.approx(full["top1"], abs=1e-6)
    assert resumed["nc1"] == pytest.approx(full["nc1"], rel=1e-4)


class _CheckpointSpy(L.Callback):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen: list[tuple[int, bool]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.seen.append((trainer.current_epoch, self.path.is_file()))


def test_last_checkpoint_is_written_after_every_epoch_not_only_at_the_end(tmp_path: Path) -> None:
    # a run killed mid-training must find a last.ckpt to resume from
    cfg = parse_config(digits_config(trainer={"max_epochs": 3, "progress": False}))
    spy = _CheckpointSpy(tmp_path / "checkpoints" / "last.ckpt")
    fit(cfg, tmp_path, quiet=True, plots=False, callbacks=[spy])
    assert spy.seen == [(0, False), (1, True), (2, True)]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]


def test_existing_checkpoint_is_not_overwritten_without_resume(tmp_path: Path) -> None:
    cfg = parse_config(digits_config(trainer={"max_epochs": 1, "progress": False}))
    fit(cfg, tmp_path, quiet=True, plots=False)
    with pytest.raises(RunError, match="--resume"):
        fit(cfg, tmp_path, quiet=True, plots=False)


def test_resume_with_another_model_is_refused(tmp_path: Path) -> None:
    cfg = parse_config(digits_config(trainer={"max_epochs": 1, "progress": False}))
    fit(cfg, tmp_path, quiet=True, plots=False)
    other = parse_config(
        digits_config(model={"name": "resnet20"}, trainer={"max_epochs": 1, "progress": False})
    )
    with pytest.raises(RunError, match="small_cnn"):
        fit(other, tmp_path, resume=True, quiet=True, plots=False)


def test_resume_refuses_changed_settings_and_names_them(tmp_path: Path) -> None:
    cfg = parse_config(digits_config(trainer={"max_epochs": 1, "progress": False}))
    fit(cfg, tmp_path, quiet=True, plots=False)
    changed = parse_config(
        digits_config(optim={"lr": 0.1}, trainer={"max_epochs": 2, "progress": False})
    )
    with pytest.raises(RunError, match=r"optim\.lr: 0\.05 -> 0\.1") as info:
        fit(changed, tmp_path, resume=True, quiet=True, plots=False)
    # a cosine schedule is laid out over max_epochs: resuming it longer would be a hybrid
    assert "trainer.max_epochs: 1 -> 2 (the cosine learning-rate schedule" in str(info.value)
    longer = parse_config(digits_config(trainer={"max_epochs": 2, "progress": False}))
    with pytest.raises(RunError, match=r"only a constant schedule may be extended"):
        fit(longer, tmp_path, resume=True, quiet=True, plots=False)


def test_resume_may_extend_a_constant_schedule(tmp_path: Path) -> None:
    constant = {"lr": 0.05, "schedule": "constant"}
    cfg = parse_config(digits_config(optim=constant, trainer={"max_epochs": 1, "progress": False}))
    fit(cfg, tmp_path, quiet=True, plots=False)
    longer = parse_config(
        digits_config(optim=constant, trainer={"max_epochs": 2, "progress": False})
    )
    assert fit(longer, tmp_path, resume=True, quiet=True, plots=False)["epochs"] == 2


class _FirstBatches(L.Callback):
    """Records the labels of the first training batch of every epoch."""

    def __init__(self) -> None:
        self.seen: dict[int, list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.seen[trainer.current_epoch] = batch[1].tolist()


def test_a_resumed_run_with_loader_workers_sees_the_uninterrupted_runs_batches(
    tmp_path: Path,
) -> None:
    # with worker processes the first iterator of a resumed run reads the sampler before
    # Lightning sets its epoch: the data module sets it when the loader is made
    cfg = parse_config(
        digits_config(data__num_workers=1, trainer={"max_epochs": 3, "progress": False})
    )
    full = _FirstBatches()
    fit(cfg, tmp_path / "full", quiet=True, plots=False, callbacks=[full])
    assert len({tuple(labels) for labels in full.seen.values()}) == 3  # epochs differ
    fit(cfg, tmp_path / "resumed", quiet=True, plots=False, callbacks=[StopAfter(2)])
    resumed = _FirstBatches()
    fit(cfg, tmp_path / "resumed", resume=True, quiet=True, plots=False, callbacks=[resumed])
    assert resumed.seen == {2: full.seen[2]}
