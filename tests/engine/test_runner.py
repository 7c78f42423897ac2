"""End-to-end runs of the engine on scikit-learn digits (seconds on a CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from anchorlearn.cli import main
from anchorlearn.engine.config import ConfigError, apply_overrides, parse_config
from anchorlearn.engine.runner import (
    RunError,
    build_run,
    evaluate_checkpoint,
    fit,
    load_checkpoint,
)


def digits_config(**changes) -> dict:
    raw = {
        "name": "digits",
        "task": "classification",
        "data": {"source": "digits", "imbalance_ratio": 10, "batch_size": 64},
        "model": {"name": "small_cnn", "kwargs": {"width": 8, "feat_dim": 16}},
        "losses": ["ce", {"name": "sar", "update_conf": 0.5}],
        "optim": {"lr": 0.05},
        "trainer": {"max_epochs": 2, "progress": False},
    }
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            raw[section][field] = value
        else:
            raw[section] = value
    return raw


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


class _StopAfter(L.Callback):
    """Ends training cleanly after ``epochs`` epochs, as an interruption would."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


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
    fit(cfg, tmp_path / "resumed", quiet=True, plots=False, callbacks=[_StopAfter(2), slow])
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
    from anchorlearn.engine.runner import check_devices

    # "auto" used to skip the check and start a DDP run that waited for absent processes
    with pytest.raises(RunError, match=r"--devices 4096|no CUDA device|MPS is not available"):
        check_devices(accelerator, 4096)
    if accelerator in ("auto", "cpu"):
        check_devices(accelerator, 1)  # one process is always available


def test_auto_accelerator_error_says_what_auto_picked(monkeypatch) -> None:
    from anchorlearn.engine import runner

    monkeypatch.setattr(runner.torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(runner.torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(RunError, match=r"\(what --accelerator auto picks here\)"):
        runner.check_devices("auto", 4096)


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


def test_cli_fit_and_eval(tmp_path: Path, capsys) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(digits_config(trainer={"max_epochs": 1})))
    out = tmp_path / "run"
    assert main(["fit", "--config", str(config), "--out", str(out), "--set", "seed=3"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 3
    assert main(["eval", "--checkpoint", str(out / "checkpoints" / "last.ckpt")]) == 0
    assert "top1" in capsys.readouterr().out
    val_json = tmp_path / "val.json"
    ckpt = str(out / "checkpoints" / "last.ckpt")
    assert main(["eval", "--checkpoint", ckpt, "--split", "val", "--out", str(val_json)]) == 0
    assert json.loads(val_json.read_text())["split"] == "val"


def test_cli_compare_unknown_column_is_one_line_and_keeps_the_runs(tmp_path: Path, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(digits_config(losses=["ce"], trainer={"max_epochs": 1})))
    args = ["compare", str(config), "--seeds", "0", "--out", str(tmp_path / "grid")]
    assert main([*args, "--columns", "top1,bogus"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the training's output
    assert last.startswith("anchorlearn: error: --columns: no run has 'bogus'")
    assert "balanced_acc" in last and "center_drift" in last
    assert (tmp_path / "grid" / "digits" / "seed0" / "metrics.json").is_file()
    assert main([*args, "--columns", "top1,center_drift"]) == 0
    assert "already done" in capsys.readouterr().out


def test_cli_negative_seed_is_a_config_error(tmp_path: Path, capsys) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(digits_config()))
    assert main(["fit", "--config", str(config), "--out", str(tmp_path / "r"), "--seed", "-1"]) == 2
    assert "seed must be >= 0, got -1" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_cli_config_typo_is_one_line(tmp_path: Path, capsys) -> None:
    config = tmp_path / "cfg.yaml"
    raw = digits_config()
    raw["trainer"]["max_epoch"] = 3
    config.write_text(yaml.safe_dump(raw))
    assert main(["fit", "--config", str(config), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "trainer.max_epoch" in err and "max_epochs" in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: [1,\n", "is not valid YAML: expected the node content"),
        ("a: 1\n  b: 2\n", "is not valid YAML: mapping values are not allowed here (line 2"),
        ("", "is empty"),
        ("# only a comment\n", "is empty"),
        ("- 1\n- 2\n", "the top level must be a mapping, got list"),
    ],
)
@pytest.mark.parametrize("command", ["fit", "pretrain"])
def test_cli_broken_config_files_are_one_line(tmp_path: Path, capsys, command, text, message):
    config = tmp_path / "cfg.yaml"
    config.write_text(text)
    assert main([command, "--config", str(config), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(config) in err and message in err
    assert not (tmp_path / "r").exists()


def test_cli_unparsable_set_value_names_the_override(tmp_path: Path, capsys) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(digits_config()))
    args = ["fit", "--config", str(config), "--out", str(tmp_path / "r")]
    assert main([*args, "--set", "data.batch_size=[1,"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--set data.batch_size=[1,: the value is not valid YAML" in err


# "64-true" and "16-true" used to pass validation and crash in the first validation step
@pytest.mark.parametrize("precision", ["15", "64-true", "16-true", "bf16-true"])
def test_cli_flags_are_validated_before_anything_is_written(
    tmp_path: Path, capsys, precision: str
) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(digits_config()))
    args = ["fit", "--config", str(config), "--out", str(tmp_path / "r"), "--precision", precision]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "trainer.precision must be one of" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("seeds", "message"),
    [("0,a", "comma-separated integers"), ("0,0", "distinct"), ("-1", "non-negative")],
)
@pytest.mark.parametrize("command", ["compare", "demo"])
def test_cli_bad_seeds_name_the_flag(tmp_path: Path, capsys, command, seeds, message) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(digits_config()))
    args = [command, f"--seeds={seeds}", "--out", str(tmp_path / "r")]
    args[1:1] = [str(config)] if command == "compare" else []
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "argument --seeds" in err and message in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("command", ["fit", "eval", "compare", "demo", "data"])
def test_every_command_has_help(command: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "anchorlearn", command, "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    assert "usage: anchorlearn" in result.stdout


def test_compare_keeps_finished_runs(tmp_path: Path, capsys) -> None:
    from anchorlearn.engine.compare import run_grid, write_results

    configs = [
        ("ce", digits_config(losses=["ce"], trainer={"max_epochs": 1, "progress": False})),
        ("ce_sar", digits_config(trainer={"max_epochs": 1, "progress": False})),
    ]
    results = run_grid(configs, [0, 1], tmp_path)
    table = write_results(results, tmp_path, ["top1", "nc1"], percent=["top1"])
    assert table.count("\n") == 3 and "| ce_sar | 2 |" in table
    assert (tmp_path / "results.csv").read_text().count("\n") == 5
    capsys.readouterr()
    # how a run reported is not a setting of the run: it is reused
    again = run_grid(configs, [0, 1], tmp_path, overrides=["trainer.progress=true"])
    assert capsys.readouterr().out.count("already done") == 4
    assert again["ce"][1]["top1"] == results["ce"][1]["top1"]
    # other settings are: the finished 1-epoch runs used to be kept as if they had them
    with pytest.raises(RunError, match=r"ce/seed0 is a finished run .*max_epochs: 1 -> 3"):
        run_grid(configs, [0, 1], tmp_path, overrides=["trainer.max_epochs=3"])
    with pytest.raises(RunError, match=r"data\.imbalance_ratio: 10\.0 -> 1\.0"):
        run_grid(configs, [0], tmp_path, overrides=["data.imbalance_ratio=1"])


def test_compare_refuses_two_configs_with_one_name(tmp_path: Path) -> None:
    from anchorlearn.engine.compare import run_grid

    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text(yaml.safe_dump(digits_config()))
    second.write_text(yaml.safe_dump(digits_config(losses=["ce"])))
    with pytest.raises(RunError, match=r"a\.yaml and .*b\.yaml are both named 'digits'"):
        run_grid([first, second], [0], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_compare_table_uses_the_sample_std_and_drift_has_none() -> None:
    from anchorlearn.engine.compare import aggregate, markdown_table

    centers = [[[0.0, 1.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 0.1]], [[0.1, 1.0], [1.0, 0.0]]]
    runs = [
        {"seed": s, "top1": v, "class_centers": centers[s]} for s, v in enumerate([0.1, 0.2, 0.6])
    ]
    rows = aggregate({"m": runs}, ["top1", "center_drift"])
    assert rows[0]["top1"] == pytest.approx(0.3)
    # sample std of 0.1, 0.2, 0.6: sqrt((0.04 + 0.01 + 0.09) / 2); np.std's default gives 0.216
    assert rows[0]["top1_std"] == pytest.approx(0.26458, abs=1e-5)
    table = markdown_table(rows, ["top1", "center_drift"], percent=["top1"])
    assert "| m | 3 | 30.00 ± 26.46 | " in table
    assert table.rstrip().endswith("|") and table.splitlines()[-1].count("±") == 1


def test_center_drift_compares_the_classes_every_seed_has() -> None:
    from anchorlearn.engine.compare import aggregate
    from anchorlearn.metrics.geometry import center_drift

    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 3, generator=generator), torch.randn(4, 3, generator=generator)
    # seed 1's subsample missed class 1, seed 2's missed class 2: rows 1 and 2 are other classes
    runs = [
        {"class_centers": a.tolist(), "class_center_labels": [0, 1, 2, 3]},
        {"class_centers": b[[0, 2, 3]].tolist(), "class_center_labels": [0, 2, 3]},
        {"class_centers": a[[0, 1, 3]].tolist(), "class_center_labels": [0, 1, 3]},
    ]
    expected = center_drift([a[[0, 3]], b[[0, 3]], a[[0, 3]]])
    assert aggregate({"m": runs}, ["center_drift"])[0]["center_drift"] == pytest.approx(expected)
    # runs written before the labels were recorded hold every class
    legacy = [{"class_centers": a.tolist()}, {"class_centers": b.tolist()}]
    assert aggregate({"m": legacy}, ["center_drift"])[0]["center_drift"] == pytest.approx(
        center_drift([a, b])
    )


@pytest.mark.parametrize(
    "path",
    sorted(
        str(p)
        for folder in ("fmnist_lt", "scenes")
        for p in (Path(__file__).parents[2] / "configs" / folder).glob("*.yaml")
    ),
)
def test_shipped_supervised_configs_are_valid(path: str) -> None:
    from anchorlearn.engine.config import load_config

    cfg = load_config(path)
    assert cfg.losses and cfg.trainer.max_epochs >= 1


def test_cli_eval_split_choices_are_the_evaluable_splits() -> None:
    # the CLI spells the choices itself so that `--help` does not import torch
    from anchorlearn.cli import build_parser
    from anchorlearn.engine.evaluate import SPLITS

    parser = build_parser()
    args = parser.parse_args(["eval", "--checkpoint", "x.ckpt", "--split", "val"])
    assert args.split == "val"
    eval_parser = parser._subparsers._group_actions[0].choices["eval"]
    (split_action,) = [a for a in eval_parser._actions if a.dest == "split"]
    assert tuple(split_action.choices) == SPLITS


def test_compare_jobs_trains_in_processes_with_the_same_results(tmp_path: Path, capsys) -> None:
    from anchorlearn.engine.compare import run_grid

    configs = [("ce", digits_config(losses=["ce"], trainer={"max_epochs": 1, "progress": False}))]
    here = run_grid(configs, [0, 1], tmp_path / "here")
    parallel = run_grid(configs, [0, 1], tmp_path / "parallel", jobs=2)
    assert [r["top1"] for r in parallel["ce"]] == [r["top1"] for r in here["ce"]]
    assert (tmp_path / "parallel" / "ce" / "seed1" / "fit.log").stat().st_size > 0
    assert (tmp_path / "parallel" / "ce" / "seed0" / "plots" / "tsne.png").exists()
    assert not (tmp_path / "parallel" / "ce" / "seed1" / "plots").exists()
    bad = [("broken", digits_config(model={"name": "small_cnn", "kwargs": {"width": -1}}))]
    with pytest.raises(RunError, match=r"broken seed 0 \(exit 2, see .*fit\.log\)"):
        run_grid(bad, [0], tmp_path / "bad", jobs=2)


def test_compare_tabulates_one_class_with_a_per_class_column(tmp_path: Path) -> None:
    from anchorlearn.engine.compare import aggregate, write_results

    runs = {
        "a": [
            {"seed": 0, "top1": 0.5, "per_class": {"cat": 0.25, "dog": None}},
            {"seed": 1, "top1": 0.7, "per_class": {"cat": 0.75, "dog": 0.5}},
        ]
    }
    row = aggregate(runs, ["per_class.cat", "per_class.dog"])[0]
    assert row["per_class.cat"] == pytest.approx(0.5)
    assert row["per_class.dog"] == pytest.approx(0.5)  # the seed without a value is left out
    write_results(runs, tmp_path, ["top1", "per_class.cat"], percent=["top1", "per_class.cat"])
    assert "| a | 2 | 60.00 ± 14.14 | 50.00 ± 35.36 |" in (tmp_path / "results.md").read_text()
    assert "a,1,0.7,0.75" in (tmp_path / "results.csv").read_text()
