"""Floors of the SSL tables: ``anchorlearn probe --random-init`` and ``--pixels`` (a randomly
initialised encoder, raw pixels) through the checkpoint probe's evaluation, on tiny digits runs."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from tests.engine.test_ssl import tiny_config

from anchorlearn.cli import main
from anchorlearn.engine import ssl_evaluate
from anchorlearn.engine.ssl_config import parse_pretrain_config
from anchorlearn.engine.ssl_runner import build_pretrain_run, pretrain, probe_floor


def config_file(tmp_path: Path, method: str = "pcl") -> Path:
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(tiny_config(method)))
    return path


def standardised_pixels(dm) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened preprocessed train / test images, standardised with the train statistics."""
    train = dm.preprocess(dm.labelled_dataset("train").tensors[0]).flatten(1)
    test = dm.preprocess(dm.labelled_dataset("test").tensors[0]).flatten(1)
    mean, std = train.mean(dim=0), train.std(dim=0)
    std[std == 0] = 1.0
    return (train - mean) / std, (test - mean) / std


def plain_knn(train, train_labels, test, num_classes: int, k: int, temperature: float):
    """Weighted cosine kNN, one test row at a time."""
    train = F.normalize(train.double(), dim=1)
    predictions = []
    for row in F.normalize(test.double(), dim=1):
        sims = train @ row
        top = sims.topk(min(k, len(sims)))
        votes = torch.zeros(num_classes, dtype=torch.float64)
        for sim, index in zip(top.values, top.indices, strict=True):
            votes[train_labels[index]] += torch.exp(sim / temperature)
        predictions.append(int(votes.argmax()))
    return torch.tensor(predictions)


def test_floors_report_the_metrics_of_a_checkpoint_probe(tmp_path: Path) -> None:
    cfg_path = config_file(tmp_path, "moco")
    pretrain(parse_pretrain_config(tiny_config("moco")), tmp_path / "run", quiet=True)
    ckpt = str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    results = {}
    for flags, name in (
        (["--checkpoint", ckpt], "checkpoint"),
        (["--random-init", "--config", str(cfg_path)], "random_init"),
        (["--pixels", "--config", str(cfg_path)], "pixels"),
    ):
        out = tmp_path / f"{name}.json"
        assert main(["probe", *flags, "--out", str(out)]) == 0
        results[name] = json.loads(out.read_text())
        assert results[name]["encoder"] == name
    keys = set(results["checkpoint"])
    assert {"linear_probe", "knn", "nmi", "ami", "alignment", "uniformity"} <= keys
    for name in ("random_init", "pixels"):
        assert set(results[name]) == keys, name
        assert results[name]["num_test"] == results["checkpoint"]["num_test"] == 128
        for key in ("linear_probe", "knn", "nmi", "ami"):
            assert 0.0 <= results[name][key] <= 1.0, (name, key)
        assert 0.0 <= results[name]["alignment"] <= 4.0
        assert results[name]["uniformity"] <= 0.0


def test_pixel_floor_runs_the_metrics_on_standardised_flattened_pixels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = parse_pretrain_config(tiny_config("pcl"))
    dm, _ = build_pretrain_run(cfg)
    train, test = standardised_pixels(dm)
    train_labels = dm.labelled_dataset("train").tensors[1]
    test_labels = dm.labelled_dataset("test").tensors[1]
    seen = {}
    real_probe = ssl_evaluate.linear_probe_accuracy

    def recording_probe(*args, **kwargs):
        seen["args"] = args
        return real_probe(*args, **kwargs)

    monkeypatch.setattr(ssl_evaluate, "linear_probe_accuracy", recording_probe)
    metrics = probe_floor(cfg, "pixels")
    assert metrics["encoder"] == "pixels"
    assert train.shape == (256, 64)  # 8 x 8 digits, one channel
    torch.testing.assert_close(seen["args"][0], train)
    torch.testing.assert_close(seen["args"][2], test)
    assert torch.equal(seen["args"][1], train_labels)
    ev = cfg.eval
    expected = plain_knn(train, train_labels, test, 10, ev.knn_k, ev.knn_temperature)
    assert metrics["knn"] == pytest.approx(float((expected == test_labels).double().mean()))


def test_random_init_floor_is_the_untrained_network_of_the_seed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    raw = tiny_config("pcl")
    seen = []
    real_knn = ssl_evaluate.knn_accuracy

    def recording_knn(*args, **kwargs):
        seen.append(args[0])
        return real_knn(*args, **kwargs)

    monkeypatch.setattr(ssl_evaluate, "knn_accuracy", recording_knn)
    first = probe_floor(parse_pretrain_config(raw), "random_init")
    again = probe_floor(parse_pretrain_config(raw), "random_init")
    other = probe_floor(parse_pretrain_config({**raw, "seed": 5}), "random_init")
    assert first == again
    assert first["encoder"] == "random_init" and other["seed"] == 5
    assert not torch.equal(seen[0], seen[2])
    L.seed_everything(0, verbose=False)
    dm, module = build_pretrain_run(parse_pretrain_config(raw))
    module.eval()
    with torch.no_grad():
        images = dm.preprocess(dm.labelled_dataset("train").tensors[0])
        torch.testing.assert_close(seen[0], module.moco.encoder_q.features(images))


def test_probe_floor_rejects_a_bad_kind_and_overrides_with_a_config_object() -> None:
    cfg = parse_pretrain_config(tiny_config("pcl"))
    with pytest.raises(ValueError, match=r"kind must be one of .*got 'noise'"):
        probe_floor(cfg, "noise")
    with pytest.raises(ValueError, match="overrides apply to a config path only"):
        probe_floor(cfg, "pixels", overrides=["seed=1"])
    with pytest.raises(TypeError, match="config must be a PretrainConfig or a path, got int"):
        probe_floor(3, "pixels")  # type: ignore[arg-type]


def test_cli_floor_applies_seed_and_set(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg_path, out = config_file(tmp_path), tmp_path / "m.json"
    argv = ["probe", "--pixels", "--config", str(cfg_path), "--seed", "3", "--out", str(out)]
    assert main([*argv, "--set", "data.max_test_samples=100"]) == 0
    stored = json.loads(out.read_text())
    assert (stored["encoder"], stored["seed"], stored["num_test"]) == ("pixels", 3, 100)
    assert "knn" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--pixels"], "--pixels needs --config"),
        (["--random-init"], "--random-init needs --config"),
        (["--checkpoint", "x.ckpt", "--config", "c.yaml"], "--config is only for --random-init"),
        (["--checkpoint", "x.ckpt", "--seed", "0"], "--seed is only for --random-init"),
        (["--checkpoint", "x.ckpt", "--set", "seed=1"], "--set is only for --random-init"),
        (
            ["--pixels", "--config", "c.yaml", "--allow-data-change"],
            "--allow-data-change is only for --checkpoint",
        ),
    ],
)
def test_cli_probe_flag_errors_are_one_line(
    extra: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    assert main(["probe", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("anchorlearn: error: ") and message in err
    assert "\n" not in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--checkpoint", "x.ckpt", "--pixels"], "not allowed with argument --checkpoint"),
        (["--random-init", "--pixels"], "not allowed with argument --random-init"),
        ([], "one of the arguments --checkpoint --random-init --pixels is required"),
    ],
)
def test_cli_probe_encoders_are_mutually_exclusive(
    extra: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["probe", *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
