"""Self-supervised pretraining (MoCo, PCL, PAUC): tiny end-to-end runs on scikit-learn digits,
the E-step callback, configs and the CLI (the E-step itself: tests/cluster/test_estep.py)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from anchorlearn.cli import main
from anchorlearn.cluster import gather_and_cluster, kmeans
from anchorlearn.engine.rundir import RunError
from anchorlearn.engine.schema import ConfigError
from anchorlearn.engine.ssl_config import load_pretrain_config, parse_pretrain_config
from anchorlearn.engine.ssl_evaluate import estep_time_metrics
from anchorlearn.engine.ssl_module import EStepCallback
from anchorlearn.engine.ssl_runner import build_pretrain_run, load_pretrain_checkpoint, pretrain
from anchorlearn.models import list_models

NUM_TRAIN = 256
KS = [6, 12]


def tiny_config(method: str, **sections) -> dict:
    """A run of a few seconds: 256 digits, one epoch, a small network and queue."""
    raw = {
        "name": f"tiny_{method}",
        "method": method,
        "data": {
            "source": "digits",
            "batch_size": 64,
            "max_train_samples": NUM_TRAIN,
            "max_test_samples": 128,
        },
        "model": {"kwargs": {"width": 8, "feat_dim": 16}, "queue_size": 256},
        "cluster": {"num_clusters": KS, "warmup_epochs": 0, "niter": 5},
        "optim": {"lr": 0.05},
        "trainer": {"max_epochs": 1, "progress": False, "log_every_n_steps": 1},
        "eval": {"tsne": False, "probe_steps": 30},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return raw


def callback_state(run_dir: Path, name: str) -> dict:
    """The state the callback ``name`` stored in the run's last checkpoint."""
    callbacks = load_pretrain_checkpoint(run_dir / "checkpoints" / "last.ckpt")["callbacks"]
    return callbacks[name]


@pytest.fixture(scope="module")
def pcl_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("ssl") / "pcl"
    cfg = parse_pretrain_config(tiny_config("pcl", eval={"tsne": True, "tsne_points": 100}))
    metrics = pretrain(cfg, run_dir, quiet=True)
    return run_dir, metrics


@pytest.mark.parametrize("method", ["moco", "pauc"])
def test_one_epoch_run_of_each_method_writes_metrics(tmp_path: Path, method: str) -> None:
    run_dir = tmp_path / method
    metrics = pretrain(parse_pretrain_config(tiny_config(method)), run_dir, quiet=True)
    stored = json.loads((run_dir / "metrics.json").read_text())
    assert stored["method"] == method
    for key in ("linear_probe", "knn", "nmi", "ami"):
        assert 0.0 <= stored[key] <= 1.0, key
    assert stored["knn"] == pytest.approx(metrics["knn"])
    assert 0.0 <= stored["alignment"] <= 4.0
    assert stored["uniformity"] <= 0.0
    assert stored["coagulation"] > 0.0
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert (run_dir / "logs" / "version_0" / "metrics.csv").exists()
    if method == "moco":
        assert stored["estep_share"] == 0.0
        assert stored["estep_embed_seconds_mean"] == stored["estep_cluster_seconds_mean"] == 0.0
    else:
        assert 0.0 < stored["estep_share"] < 1.0


def test_pcl_run_writes_the_run_directory(pcl_run: tuple[Path, dict]) -> None:
    run_dir, metrics = pcl_run
    for name in ("config.yaml", "metrics.json", "checkpoints/last.ckpt", "plots/tsne.png"):
        assert (run_dir / name).exists(), name
    assert 0.0 <= metrics["linear_probe"] <= 1.0
    assert 0.0 <= metrics["knn"] <= 1.0
    assert metrics["estep_seconds_mean"] > 0.0
    # the E-step is the embedding, then the clustering (each mean rounded to 0.01 s)
    embed, cluster = metrics["estep_embed_seconds_mean"], metrics["estep_cluster_seconds_mean"]
    assert embed + cluster == pytest.approx(metrics["estep_seconds_mean"], abs=0.02)
    for row in callback_state(run_dir, "EStepCallback")["timings"]:
        assert 0.0 < row["estep_embed_s"] and 0.0 < row["estep_cluster_s"]
        assert row["estep_embed_s"] + row["estep_cluster_s"] <= row["estep_s"]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["loss"]["protonce_weight"] == 1.0
    assert config["loss"]["align_weight"] == 0.0
    header = (run_dir / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    for column in ("train/protonce_epoch", "time/estep_s", "time/train_epoch_s"):
        assert column in header, column


def test_no_estep_and_no_prototype_loss_during_the_warmup(tmp_path: Path) -> None:
    raw = tiny_config("pcl", cluster={"warmup_epochs": 1}, trainer={"max_epochs": 2})
    run_dir = tmp_path / "warm"
    pretrain(parse_pretrain_config(raw), run_dir, quiet=True)
    with open(run_dir / "logs" / "version_0" / "metrics.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("train/protonce_epoch")]
    by_epoch = {int(row["epoch"]): row for row in rows}
    assert sorted(by_epoch) == [0, 1]
    assert float(by_epoch[0]["train/protonce_epoch"]) == 0.0
    assert float(by_epoch[0]["time/estep_s"]) == 0.0
    assert float(by_epoch[1]["train/protonce_epoch"]) > 0.0
    assert float(by_epoch[1]["time/estep_s"]) > 0.0
    state = load_pretrain_checkpoint(run_dir / "checkpoints" / "last.ckpt")["state_dict"]
    assert int(state["estep_epoch"]) == 1


def test_estep_clusters_the_momentum_embeddings_of_the_unaugmented_images() -> None:
    cfg = parse_pretrain_config(tiny_config("pcl"))
    dm, module = build_pretrain_run(cfg)
    module.train()  # as at an epoch start
    with torch.no_grad():  # the query encoder differs from the momentum one after training
        for param in module.moco.encoder_q.parameters():
            param.add_(0.1 * torch.randn_like(param))
    trainer = SimpleNamespace(datamodule=dm, global_rank=0, world_size=1, current_epoch=3)
    estep = EStepCallback(cfg.cluster, seed=7)  # k and the k-means settings: the config's
    results = []
    for global_seed in (1, 2):  # augmentations would draw from the global generator
        torch.manual_seed(global_seed)
        results.append(estep.run_estep(trainer, module))
    images = dm.labelled_dataset("train").tensors[0]
    features = module.moco.embed(dm.preprocess(images), momentum=True)
    expected = gather_and_cluster(
        features, torch.arange(len(images)), len(images), KS, niter=5, seed=7 * 1000 + 3
    )
    for result in results:
        for g in range(len(KS)):
            assert torch.equal(result.assignments[g], expected.assignments[g])
            torch.testing.assert_close(result.prototypes[g], expected.prototypes[g])
    assert int(module.estep_epoch) == 3


def test_estep_buffers_have_the_right_shapes_and_index_their_prototypes(
    pcl_run: tuple[Path, dict],
) -> None:
    run_dir, _ = pcl_run
    ckpt = load_pretrain_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    state = ckpt["state_dict"]
    assert int(state["estep_epoch"]) == 0
    for g, k in enumerate(KS):
        prototypes = state[f"prototypes_{g}"]
        phi = state[f"concentrations_{g}"]
        assignments = state[f"assignments_{g}"]
        assert prototypes.shape == (k, 128)
        torch.testing.assert_close(prototypes.norm(dim=1), torch.ones(k))
        assert phi.shape == (k,) and bool((phi > 0).all())
        assert float(phi.mean()) == pytest.approx(0.2, rel=1e-4)
        assert assignments.shape == (NUM_TRAIN,) and assignments.dtype == torch.long
        assert int(assignments.min()) >= 0 and int(assignments.max()) < k


def test_probe_from_the_checkpoint_reproduces_the_run(
    pcl_run: tuple[Path, dict], tmp_path: Path
) -> None:
    run_dir, metrics = pcl_run
    out, plots = tmp_path / "probe.json", tmp_path / "plots"
    ckpt = str(run_dir / "checkpoints/last.ckpt")
    assert main(["probe", "--checkpoint", ckpt, "--out", str(out), "--plots", str(plots)]) == 0
    probed = json.loads(out.read_text())
    for key in ("knn", "linear_probe", "alignment", "nmi"):
        assert probed[key] == pytest.approx(metrics[key]), key
    # the run folder stands for its last.ckpt
    assert main(["probe", "--checkpoint", str(run_dir), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["knn"] == pytest.approx(metrics["knn"])
    assert (plots / "tsne.png").stat().st_size > 1000


def test_existing_checkpoint_needs_resume_and_resume_continues(
    pcl_run: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, _ = pcl_run
    config = tmp_path / "pcl.yaml"
    # a constant learning rate: only then may a resumed run train for longer
    config.write_text(
        yaml.safe_dump(tiny_config("pcl", optim={"lr": 0.05, "schedule": "constant"}))
    )
    args = ["pretrain", "--config", str(config), "--out", str(run_dir)]
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    resumed = tmp_path / "resumed"
    assert main([*args[:-1], str(resumed)]) == 0
    first_clock = callback_state(resumed, "TrainClock")["seconds"]
    changed = ["--resume", "--set", "trainer.max_epochs=2", "--set", "loss.protonce_weight=2"]
    assert main([*args[:-1], str(resumed), *changed]) == 2
    assert "loss.protonce_weight: 1.0 -> 2.0" in capsys.readouterr().err
    cosine = ["--resume", "--set", "trainer.max_epochs=2", "--set", "optim.schedule=cosine"]
    assert main([*args[:-1], str(resumed), *cosine]) == 2
    assert "only a constant schedule may be extended" in capsys.readouterr().err
    assert main([*args[:-1], str(resumed), "--resume", "--set", "trainer.max_epochs=2"]) == 0
    metrics = json.loads((resumed / "metrics.json").read_text())
    assert metrics["epochs"] == 2
    # the clock and the E-step timings go on from the checkpoint (unrounded: the metrics'
    # 0.1 s rounding can hide a tiny epoch)
    timings = callback_state(resumed, "EStepCallback")["timings"]
    assert [row["epoch"] for row in timings] == [0, 1]
    second_epoch = timings[1]["estep_s"] + timings[1]["train_epoch_s"]
    assert callback_state(resumed, "TrainClock")["seconds"] >= first_clock + 0.9 * second_epoch
    assert (resumed / "logs" / "version_1").is_dir()


@pytest.mark.parametrize("name", list_models())
def test_every_factory_model_pretrains_or_is_refused_before_training(name: str) -> None:
    dense = {"seg_net", "fcn", "deeplabv3plus", "mlp_head"}
    raw = tiny_config("pcl")
    raw["model"] = {"name": name, "queue_size": 256}
    if name == "fcn":  # HRNet-W18, not the default W48: four times faster to build
        raw["model"]["kwargs"] = {"encoder": "hrnet_w18"}
    cfg = parse_pretrain_config(raw)
    try:
        dm, module = build_pretrain_run(cfg)
    except ConfigError as err:  # dense networks: their features are maps, not vectors
        assert f"model {name!r} cannot be pretrained" in str(err)
        assert name in dense
        return
    assert name not in dense
    images = dm.labelled_dataset("train").tensors[0][:4]
    out = module.moco(*dm.views(images))
    assert out["q"].shape == out["k"].shape == (4, 128)


def test_more_clusters_than_samples_fails_before_training(tmp_path: Path) -> None:
    cfg = parse_pretrain_config(tiny_config("pcl", cluster={"num_clusters": [8, 300]}))
    with pytest.raises(RunError, match=r"k=300 .* only 256 images"):
        pretrain(cfg, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"cluster": {"num_cluster": [5]}}, r"cluster\.num_cluster.*num_clusters"),
        ({"loss": {"protonce_wieght": 1.0}}, r"loss\.protonce_wieght.*protonce_weight"),
        ({"metod": "pcl"}, r"'metod'.*method"),
        ({"method": "simclr"}, r"method must be one of"),
        ({"loss": {"align_weight": 1.0}}, r"loss\.align_weight.*use method pauc"),
        ({"cluster": {"num_clusters": [1]}}, r"cluster\.num_clusters"),
        ({"cluster": {"warmup_epochs": 3}}, r"warmup_epochs=3 leaves no epoch"),
        ({"eval": {"knn_temperature": 0.0}}, r"eval\.knn_temperature must be > 0"),
        ({"optim": {"lr": -0.1}}, r"optim\.lr must be > 0"),
        ({"model": {"momentum": 1.0}}, r"model\.momentum must be in \[0, 1\)"),
        ({"cluster": {"warm_start": -1}}, r"cluster\.warm_start must be >= 0"),
        (
            {"cluster": {"backend": "faiss", "warm_start": 8}},
            r"cluster\.warm_start=8 applies to the torch backend only",
        ),
    ],
)
def test_config_errors_name_the_key(changes: dict, message: str) -> None:
    raw = tiny_config("pcl")
    for key, value in changes.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and key in raw else value
    with pytest.raises(ConfigError, match=message):
        parse_pretrain_config(raw)


def test_cluster_warm_start_reaches_every_kmeans_of_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import anchorlearn.cluster.estep as estep_module
    import anchorlearn.engine.ssl_evaluate as ssl_evaluate

    seen = []

    def recording_kmeans(*args, **kwargs):
        seen.append(kwargs["warm_start"])
        return kmeans(*args, **kwargs)

    monkeypatch.setattr(estep_module, "kmeans", recording_kmeans)
    monkeypatch.setattr(ssl_evaluate, "kmeans", recording_kmeans)
    # 256 samples > 2 * 4 * 12: the warm start applies at both granularities
    cfg = parse_pretrain_config(tiny_config("pcl", cluster={"warm_start": 4}))
    pretrain(cfg, tmp_path / "run", quiet=True)
    assert seen == [4] * (len(KS) + 1)  # the E-step at each k, then the test-set clustering


def test_method_defaults_and_shipped_configs() -> None:
    pauc = parse_pretrain_config(tiny_config("pauc", loss={"corr_weight": 0.0}))
    assert (pauc.loss.align_weight, pauc.loss.uniform_weight, pauc.loss.corr_weight) == (
        1.0,
        1.0,
        0.0,
    )
    moco = parse_pretrain_config(tiny_config("moco"))
    assert moco.loss.protonce_weight == 0.0
    configs = sorted((Path(__file__).resolve().parents[2] / "configs" / "ssl").glob("*.yaml"))
    assert {c.stem for c in configs} >= {"moco", "pcl", "pauc", "pcl_align", "pcl_uniform"}
    shared = {
        (c.data.max_train_samples, c.data.batch_size, c.trainer.max_epochs, c.model.name)
        for c in map(load_pretrain_config, configs)
    }
    assert len(shared) == 1


def test_the_pauc_loss_is_built_from_the_loss_section_and_the_encoder_temperature() -> None:
    from dataclasses import fields

    from anchorlearn.engine.ssl_config import PretrainLossConfig
    from anchorlearn.losses.pauc import PAUCParameters

    # the loss section is PAUCLoss's parameters (its defaults) plus InfoNCE's weight
    pauc_names = [f.name for f in fields(PAUCParameters)]
    assert [f.name for f in fields(PretrainLossConfig)] == [*pauc_names, "infonce_weight"]
    assert PretrainLossConfig().align_alpha == PAUCParameters().align_alpha == 2.0
    loss = {
        "corr_weight": 0.0,
        "num_negatives": 50,
        "align_alpha": 1.5,
        "uniform_mode": "assignment",
        "corr_mode": "vicreg",
        "corr_features": "batch_means",
    }
    cfg = parse_pretrain_config(tiny_config("pauc", loss=loss, model={"temperature": 0.3}))
    _, module = build_pretrain_run(cfg)
    built = module.proto_loss
    assert built.weights == {
        "protonce": 1.0,
        "alignment": 1.0,
        "uniformity": 1.0,
        "correlation": 0.0,
    }
    assert (built.protonce.temperature, built.protonce.num_negatives) == (0.3, 50)
    assert (built.alignment.alpha, built.alignment.view_weight) == (1.5, 0.0)
    assert (built.uniformity.t, built.uniformity.mode, built.uniformity.temperature) == (
        2.0,
        "assignment",
        0.3,
    )
    assert (built.correlation.mode, built.correlation.lambda_offdiag) == ("vicreg", 5e-3)
    assert built.corr_features == "batch_means"
    with pytest.raises(ConfigError, match=r"unknown key 'loss\.allign_alpha'"):
        parse_pretrain_config(tiny_config("pauc", loss={"allign_alpha": 1.0}))


def test_estep_time_metrics_average_the_epochs_that_had_an_estep() -> None:
    timings = [
        {"estep_s": 0.0, "train_epoch_s": 2.0},  # the warm-up: no E-step
        {"estep_s": 1.0, "estep_embed_s": 0.25, "estep_cluster_s": 0.75, "train_epoch_s": 3.0},
        {"estep_s": 2.0, "estep_embed_s": 0.5, "estep_cluster_s": 1.5, "train_epoch_s": 4.0},
    ]
    assert estep_time_metrics(timings) == {
        "estep_seconds_mean": 1.5,
        "estep_embed_seconds_mean": 0.38,  # 0.375, rounded to 0.01 s
        "estep_cluster_seconds_mean": 1.12,
        "train_epoch_seconds_mean": 3.0,
        "estep_share": round(3.0 / 12.0, 4),
    }
    assert estep_time_metrics([])["estep_share"] == 0.0


def test_pretrain_and_probe_help(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("pretrain", "probe"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: anchorlearn {command}" in capsys.readouterr().out


def test_probe_rejects_a_file_that_is_not_a_pretraining_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bogus = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}}, bogus)
    assert main(["probe", "--checkpoint", str(bogus)]) == 2
    assert "not an anchorlearn pretraining checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_ddp_pretraining_keeps_the_ranks_in_step(tmp_path: Path) -> None:
    config = tmp_path / "ddp.yaml"
    raw = tiny_config("pauc", cluster={"warmup_epochs": 1}, trainer={"max_epochs": 2})
    config.write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "anchorlearn.cli", "pretrain", "--config", str(config)]
    run_dir = tmp_path / "run"
    subprocess.run([*command, "--out", str(run_dir), "--devices", "2"], check=True, timeout=300)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["ddp_world_size"] == 2
    assert metrics["ddp_max_state_diff"] == 0.0
