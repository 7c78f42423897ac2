"""Pretraining's warm-up as a fraction of training, the validation split held out of the
training images, the views' crop scale and the low-shot probes of the evaluation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from anchorlearn.data.augment import ssl_augment
from anchorlearn.engine.datamodules import TwoViewDataModule
from anchorlearn.engine.rundir import RunError
from anchorlearn.engine.schema import ConfigError
from anchorlearn.engine.ssl_config import ClusterConfig, parse_pretrain_config, warmup_epochs
from anchorlearn.engine.ssl_runner import pretrain

from .test_ssl import callback_state, tiny_config


def _without_warmup_epochs(raw: dict, **cluster) -> dict:
    raw["cluster"] = {k: v for k, v in raw["cluster"].items() if k != "warmup_epochs"}
    raw["cluster"].update(cluster)
    return raw


@pytest.mark.parametrize(
    ("epochs", "fraction", "expected"),
    [
        (16, None, 3),
        (16, 0.2, 3),
        (6, 0.2, 1),
        (2, 0.1, 1),
        (10, 0.0, 0),
        (10, 0.55, 6),
        (3, 0.5, 2),  # halves round up
        (5, 0.5, 3),
        (25, 0.1, 3),
    ],
)
def test_warmup_fraction_rounds_to_epochs(epochs: int, fraction, expected: int) -> None:
    assert warmup_epochs(ClusterConfig(warmup_fraction=fraction), epochs) == expected


def test_warmup_epochs_when_given_wins() -> None:
    assert warmup_epochs(ClusterConfig(warmup_epochs=4), 16) == 4


@pytest.mark.parametrize(
    ("cluster", "epochs", "message"),
    [
        ({"warmup_epochs": 1, "warmup_fraction": 0.2}, 4, "both set the warm-up: keep one"),
        ({"warmup_fraction": 1.0}, 4, r"warmup_fraction must lie in \[0, 1\), got 1.0"),
        ({"warmup_fraction": -0.1}, 4, r"warmup_fraction must lie in \[0, 1\)"),
        ({"warmup_fraction": 0.5}, 1, r"a warm-up of 1 epochs \(cluster.warmup_fraction\) leaves"),
        ({"warmup_epochs": -1}, 4, "warmup_epochs must be >= 0, got -1"),
    ],
)
def test_warmup_config_errors(cluster: dict, epochs: int, message: str) -> None:
    raw = tiny_config("pcl", trainer={"max_epochs": epochs})
    raw["cluster"] = {k: v for k, v in raw["cluster"].items() if k != "warmup_epochs"}
    raw["cluster"].update(cluster)
    with pytest.raises(ConfigError, match=message):
        parse_pretrain_config(raw)


def test_warmup_fraction_delays_the_first_estep(tmp_path: Path) -> None:
    raw = _without_warmup_epochs(tiny_config("pcl", trainer={"max_epochs": 3}), warmup_fraction=0.5)
    run_dir = tmp_path / "run"
    pretrain(parse_pretrain_config(raw), run_dir, quiet=True)
    with open(run_dir / "logs" / "version_0" / "metrics.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("time/estep_s")]
    estep = {int(row["epoch"]): float(row["time/estep_s"]) for row in rows}
    # round(0.5 * 3) = 2 epochs of InfoNCE only, then an E-step at epoch 2
    assert estep[0] == 0.0 and estep[1] == 0.0 and estep[2] > 0.0


def test_a_resumed_run_with_more_epochs_keeps_its_esteps_going(tmp_path: Path) -> None:
    raw = _without_warmup_epochs(
        tiny_config("pcl", optim={"schedule": "constant"}, trainer={"max_epochs": 2}),
        warmup_fraction=0.5,
    )
    run_dir = tmp_path / "run"
    pretrain(parse_pretrain_config(raw), run_dir, quiet=True)  # warm-up 1, E-step at epoch 1
    raw["trainer"]["max_epochs"] = 6  # the fraction now asks for a warm-up of 3 epochs
    pretrain(parse_pretrain_config(raw), run_dir, resume=True, quiet=True)
    timings = callback_state(run_dir, "EStepCallback")["timings"]
    estep = {row["epoch"]: row["estep_s"] for row in timings}
    assert estep[0] == 0.0
    # without the fix, epoch 2 trained ProtoNCE on the prototypes of epoch 1's E-step
    assert all(estep[epoch] > 0.0 for epoch in range(1, 6)), estep


def test_low_shot_larger_than_a_class_is_refused_before_training(tmp_path: Path) -> None:
    raw = tiny_config("moco", eval={"low_shot": [1, 100]})
    with pytest.raises(RunError, match=r"eval.low_shot asks for 100 labels per class but class"):
        pretrain(parse_pretrain_config(raw), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(ConfigError, match="distinct labels per class"):
        parse_pretrain_config(tiny_config("moco", eval={"low_shot": [5, 5]}))


def test_a_small_validation_split_names_the_validation_settings(tmp_path: Path) -> None:
    raw = tiny_config("moco", cluster={"num_clusters": [40]})
    raw["data"].pop("max_test_samples")
    raw["data"]["val_fraction"] = 0.1
    with pytest.raises(RunError, match=r"validation split .* raise data.val_fraction"):
        pretrain(parse_pretrain_config(raw), tmp_path / "run", quiet=True)


def test_val_fraction_holds_out_training_images_and_never_scores_the_test_set() -> None:
    plain = TwoViewDataModule(source="digits", seed=1, max_train_samples=400)
    held = TwoViewDataModule(source="digits", seed=1, max_train_samples=400, val_fraction=0.25)
    assert plain.eval_split == "test" and held.eval_split == "val"
    train = plain.labelled_dataset("train")
    fit, val = held.labelled_dataset("train"), held.labelled_dataset("test")
    assert len(fit) + len(val) == len(train) and abs(len(val) - 100) <= 10

    def rows(dataset) -> set[bytes]:
        return {image.numpy().tobytes() for image in dataset.tensors[0]}

    assert rows(fit).isdisjoint(rows(val))
    assert rows(fit) | rows(val) == rows(train)
    # what the evaluation scores (the "test" split) is the held-out training images
    assert rows(held.labelled_dataset("test")) == rows(val)
    assert rows(val).isdisjoint(rows(plain.labelled_dataset("test")))
    with pytest.raises(ValueError, match="max_test_samples=50 caps the test split"):
        TwoViewDataModule(source="digits", val_fraction=0.2, max_test_samples=50)
    # stratified: every class is in the validation images
    assert set(np.unique(val.tensors[1].numpy())) == set(range(10))
    # pretraining batches come from the kept images only
    images, _ = next(iter(held.train_dataloader()))
    assert {image.numpy().tobytes() for image in images} <= rows(fit)


def test_val_fraction_refuses_a_test_cap_and_bad_fractions() -> None:
    raw = tiny_config("moco", data={"val_fraction": 0.2})
    with pytest.raises(ConfigError, match=r"data\.max_test_samples=128 caps the test split"):
        parse_pretrain_config(raw)
    raw = tiny_config("moco", data={"val_fraction": 1.0})
    with pytest.raises(ConfigError, match=r"data.val_fraction must lie in \[0, 1\)"):
        parse_pretrain_config(raw)
    with pytest.raises(ConfigError, match=r"data.crop_min_scale must lie in \(0, 1\]"):
        parse_pretrain_config(tiny_config("moco", data={"crop_min_scale": 0.0}))


def test_crop_min_scale_reaches_the_views() -> None:
    dm = TwoViewDataModule(source="digits", max_train_samples=100, crop_min_scale=0.6)
    dm.setup()
    found = [m for m in dm.two_views.modules() if type(m).__name__ == "RandomResizedCrop"]
    assert found
    assert all(tuple(map(float, m._param_generator.scale)) == (0.6, 1.0) for m in found)
    with pytest.raises(ValueError, match=r"min_scale must be in \(0, 1\], got 1.5"):
        ssl_augment(8, min_scale=1.5)
    with pytest.raises(ValueError, match=r"crop_min_scale must lie in \(0, 1\]"):
        TwoViewDataModule(source="digits", crop_min_scale=0.0)


def test_low_shot_config_checks() -> None:
    with pytest.raises(ConfigError, match=r"eval.low_shot must list distinct labels per class"):
        parse_pretrain_config(tiny_config("moco", eval={"low_shot": [0, 5]}))
    with pytest.raises(ConfigError, match=r"eval\.low_shot_draws"):
        parse_pretrain_config(tiny_config("moco", eval={"low_shot_draws": 0}))
    assert parse_pretrain_config(tiny_config("moco")).eval.low_shot == []


def test_a_run_on_the_validation_split_reports_it_with_low_shot_probes(tmp_path: Path) -> None:
    raw = tiny_config("moco", eval={"low_shot": [1, 5], "low_shot_draws": 3})
    raw["data"].pop("max_test_samples")
    raw["data"]["val_fraction"] = 0.25
    metrics = pretrain(parse_pretrain_config(raw), tmp_path / "run", quiet=True)
    assert metrics["eval_split"] == "val"
    assert metrics["num_train"] + metrics["num_test"] == 256
    for shots in (1, 5):
        assert 0.0 <= metrics[f"low_shot_{shots}"] <= 1.0
        assert metrics[f"low_shot_{shots}_std"] >= 0.0
    stored = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert stored["low_shot_5"] == metrics["low_shot_5"]
