"""The supervised objective as a config gives it: loss parameters (flat, nested or
overridden), bad objectives and out-of-range settings as config errors, the shipped
configs, and classification labels that are never void."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.engine.runfixtures import digits_config

from anchorlearn.engine.config import apply_overrides, parse_config
from anchorlearn.engine.runner import build_run, fit
from anchorlearn.engine.schema import ConfigError


@pytest.mark.parametrize(
    ("losses", "message"),
    [
        (["ce", {"name": "sar", "pull_wieght": 0.1}], "pull_wieght"),
        (["sar"], "task loss"),
        (["nonsense"], "unknown loss"),
        (["dot_regression"], "etf_classifier"),
        # these used to reach torch: a traceback, or a NaN loss once training had started
        (["ce", {"name": "sar", "seed": 1.5}], "loss sar: seed must be None or an int, got float"),
        ([{"name": "logit_adjusted", "tau": float("inf")}], "tau must be finite and >= 0"),
        (["ce", {"name": "sar", "pull_weight": "strong"}], "pull_weight must be a real number"),
        # a module cannot come from YAML, so it is not offered as a parameter
        (["ce", {"name": "sar", "projector": "mlp"}], "unknown parameter 'projector'"),
        # the void label is the data's, not a loss setting
        (["ce", {"name": "sar", "ignore_index": 3}], "unknown parameter 'ignore_index'"),
    ],
)
def test_bad_objectives_are_config_errors(tmp_path: Path, losses, message: str) -> None:
    # a parameter the loss does not take is refused when the config is read, the others
    # when the objective is built: either way before anything is written
    with pytest.raises(ConfigError, match=message):
        fit(parse_config(digits_config(losses=losses)), tmp_path, quiet=True, plots=False)
    assert not (tmp_path / "checkpoints").exists()


def test_classification_ignores_no_label_even_with_a_class_255(tmp_path: Path) -> None:
    # 256 classes: label 255 is a class, not the void label of segmentation masks
    num_classes, per_class = 256, 10
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (num_classes * per_class, 8, 8), generator=generator)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    path = tmp_path / "c256.npz"
    np.savez(path, images=images.to(torch.uint8).numpy(), labels=labels.numpy())
    raw = digits_config(losses=["ce", "sar", "ema_prototype", "center"])
    raw["data"] = {"source": f"npz:{path}", "batch_size": 32}
    dm, module = build_run(parse_config(raw))
    assert module.ignore_index is None
    assert [term.ignore_index for term in module.objective.terms] == [None] * 4
    features = torch.randn(8, module.model.feat_dim)
    logits = module.model.classifier(features)
    out = module.objective(logits, features, torch.full((8,), 255))
    assert float(out["ce/ce"]) > 0.0
    batch, _ = next(iter(dm.train_dataloader()))
    module.validation_step((dm.preprocess(batch)[:8], torch.full((8,), 255)), 0)
    assert module._val_total == 8  # label 255 counts in the validation accuracy


def test_loss_parameters_flat_nested_or_overridden_either_way() -> None:
    nested = [{"name": "ce"}, {"name": "sar", "params": {"pull_weight": 0.3}}]
    assert parse_config(digits_config(losses=nested)).losses[1].params == {"pull_weight": 0.3}
    raw = apply_overrides(digits_config(), ["losses.1.params.pull_weight=0.2"])
    assert parse_config(raw).losses[1].params == {"update_conf": 0.5, "pull_weight": 0.2}
    raw = apply_overrides(digits_config(), ["losses.1.pull_weight=0.2"])
    assert parse_config(raw).losses[1].params == {"update_conf": 0.5, "pull_weight": 0.2}
    twice = [{"name": "ce"}, {"name": "sar", "pull_weight": 0.1, "params": {"pull_weight": 0.2}}]
    with pytest.raises(ConfigError, match="'pull_weight' is given both flat and under params"):
        parse_config(digits_config(losses=twice))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"optim": {"lr": 0.0}}, r"optim\.lr must be > 0, got 0\.0"),
        ({"optim": {"lr": float("inf")}}, r"optim\.lr must be a finite number, got inf"),
        ({"data": {"imbalance_ratio": float("nan")}}, r"imbalance_ratio must be a finite number"),
        ({"optim": {"momentum": 1.5}}, r"optim\.momentum must be in \[0, 1\)"),
        ({"data": {"source": "digits", "val_fraction": 1.0}}, r"data\.val_fraction"),
        ({"data": {"source": "digits", "val_fraction": 0.0}}, r"val_fraction must be in \(0, 1\)"),
        ({"data": {"source": "digits", "imbalance_ratio": 0.5}}, r"data\.imbalance_ratio"),
        ({"data": {"source": "digits", "batch_size": 0}}, r"data\.batch_size must be >= 1"),
        ({"trainer": {"max_epochs": 0}}, r"trainer\.max_epochs must be >= 1"),
    ],
)
def test_out_of_range_settings_are_config_errors(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(digits_config(**changes))


@pytest.mark.parametrize(
    "path",
    sorted(
        str(p)
        for folder in ("fmnist_lt", "fmnist_lt_sar", "scenes", "cifar10_lt")
        for p in (Path(__file__).parents[2] / "configs" / folder).glob("*.yaml")
    ),
)
def test_shipped_supervised_configs_are_valid(path: str) -> None:
    from anchorlearn.engine.config import load_config

    cfg = load_config(path)
    assert cfg.losses and cfg.trainer.max_epochs >= 1


@pytest.mark.parametrize(("loss", "term"), [("tsc_targets", "target_ce"), ("ceco", "center_ce")])
def test_the_fixed_target_baselines_train_from_a_config(
    tmp_path: Path, loss: str, term: str
) -> None:
    raw = digits_config(losses=["ce", {"name": loss, "weight": 0.5}], trainer__log_every_n_steps=1)
    metrics = fit(parse_config(raw), tmp_path / "run", quiet=True, plots=False)
    assert 0.0 <= metrics["top1"] <= 1.0 and metrics["epochs"] == 2
    rows = list(csv.DictReader((tmp_path / "run" / "logs" / "version_0" / "metrics.csv").open()))
    logged = [float(r[f"train/{loss}/{term}"]) for r in rows if r.get(f"train/{loss}/{term}")]
    assert logged and all(math.isfinite(v) and v > 0 for v in logged)


@pytest.mark.parametrize(
    "path",
    sorted(
        str(p) for p in (Path(__file__).parents[2] / "configs" / "fmnist_lt_sar").glob("*.yaml")
    ),
    ids=lambda p: Path(p).stem,
)
def test_the_sar_variant_configs_build_and_take_a_step(path: str) -> None:
    """Every variant builds its model and objective (on digits: same class count) and its
    loss back-propagates."""
    from anchorlearn.engine.config import load_config

    cfg = load_config(path, ["data.source=digits"])
    _, module = build_run(cfg)
    module.train()
    images = torch.randn(32, 1, 8, 8)
    labels = torch.arange(32) % 10
    logits, features = module.model(images)
    out = module.objective(logits, features, labels)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert any(p.grad is not None for p in module.model.parameters())
