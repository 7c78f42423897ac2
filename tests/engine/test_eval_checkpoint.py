"""Evaluating a checkpoint written by `fit` (test and validation splits), and the
checkpoints that are refused, each with one short line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tests.engine.runfixtures import digits_config

from anchorlearn.engine.config import parse_config
from anchorlearn.engine.rundir import RunError
from anchorlearn.engine.runner import evaluate_checkpoint, fit
from anchorlearn.engine.runs import load_checkpoint


def test_eval_checkpoint_matches_fit_metrics(tmp_path: Path) -> None:
    cfg = parse_config(digits_config(trainer={"max_epochs": 1, "progress": False}))
    metrics = fit(cfg, tmp_path, quiet=True, plots=False)
    again = evaluate_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert again["top1"] == pytest.approx(metrics["top1"])
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["anchorlearn_config"]["model"]["name"] == "small_cnn"


def test_eval_on_the_validation_split_matches_the_logged_val_accuracy(tmp_path: Path) -> None:
    cfg = parse_config(digits_config(trainer={"max_epochs": 1, "progress": False}))
    test_metrics = fit(cfg, tmp_path, quiet=True, plots=False)
    last = tmp_path / "checkpoints" / "last.ckpt"
    val = evaluate_checkpoint(last, split="val", out=tmp_path / "val.json")
    # the training loop's validation_step counted the same split another way
    rows = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    logged = [r.split(",")[header.index("val/acc")] for r in rows[1:]]
    assert val["top1"] == pytest.approx(float([v for v in logged if v][-1]))
    assert val["split"] == "val"
    assert json.loads((tmp_path / "val.json").read_text())["split"] == "val"
    # the digits validation split is long-tailed, the test split is not: they differ
    assert val["top1"] != pytest.approx(test_metrics["top1"])
    with pytest.raises(ValueError, match="split must be one of test, val, got 'train'"):
        evaluate_checkpoint(last, split="train")


def test_load_checkpoint_rejects_foreign_files(tmp_path: Path) -> None:
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(RunError, match="not an anchorlearn checkpoint"):
        load_checkpoint(path)
    with pytest.raises(RunError, match="not found"):
        load_checkpoint(tmp_path / "missing.ckpt")


class _Pickled:  # a class the safe loader refuses to import
    pass


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"not a checkpoint at all", "Unsupported operand"),
        (b"PK\x03\x04 truncated", "not a ZIP archive"),
        (None, "_Pickled was not an allowed global"),
    ],
)
def test_unloadable_checkpoint_is_one_short_line(tmp_path: Path, content, reason) -> None:
    path = tmp_path / "bad.ckpt"
    if content is None:
        torch.save({"state_dict": _Pickled()}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(RunError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert "is not a loadable anchorlearn checkpoint" in message and reason in message
    assert "weights_only" not in message and "\n" not in message and len(message) < 400
