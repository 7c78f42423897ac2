"""The t-SNE pictures of a run: what is drawn with the points, the titles and the notes (the
drawing itself is replaced by a recorder: tests/viz/test_plots.py tests it)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.engine.runfixtures import npz_config, write_npz

from anchorlearn.cluster import gather_and_cluster
from anchorlearn.engine.config import parse_config
from anchorlearn.engine.evaluate import regularizer_state, write_run_plots
from anchorlearn.engine.runner import build_run, fit
from anchorlearn.engine.ssl_config import parse_pretrain_config
from anchorlearn.engine.ssl_evaluate import evaluate_pretrained, prototype_tsne_text
from anchorlearn.engine.ssl_runner import build_pretrain_run
from anchorlearn.viz import plots


@pytest.fixture
def tsne_calls(monkeypatch) -> list[dict]:
    """The arguments of every plot_tsne call, in place of the t-SNE."""
    calls: list[dict] = []

    def record(features, labels, path, **kwargs) -> Path:
        calls.append({"features": features, "labels": labels, **kwargs})
        return Path(path)

    monkeypatch.setattr(plots, "plot_tsne", record)
    return calls


def digits_run(losses: list) -> tuple:
    raw = {
        "name": "digits_sar",
        "task": "classification",
        "data": {"source": "digits", "batch_size": 64},
        "model": {"name": "small_cnn", "kwargs": {"width": 8, "feat_dim": 16}},
        "losses": losses,
        "trainer": {"max_epochs": 1, "progress": False},
    }
    return build_run(parse_config(raw))


def test_a_gate_that_never_opened_is_said_in_the_metrics_and_on_the_tsne(
    tmp_path: Path, tsne_calls: list[dict]
) -> None:
    dm, module = digits_run(["ce", "sar"])
    sar = module.objective.terms[1]
    assert regularizer_state(module) == {
        "sar_gate_open_step": -1,
        "sar_gate_opened": False,
        "sar_steps": 0,
    }
    outputs = {"features": torch.randn(40, 16), "labels": torch.arange(40) % 10}
    write_run_plots(module, dm, tmp_path, task="classification", outputs=outputs, name="digits_sar")
    call = tsne_calls[-1]
    assert call["note"] == "SAR gate never opened: no semantic anchors"
    assert call["anchors"] is None
    assert call["title"] == "digits_sar: test features (t-SNE)"
    assert call["class_names"] == list(dm.class_names)

    sar.gate_open_step.fill_(3)
    sar.step.fill_(5)
    sar.semantic_anchors.copy_(torch.randn(10, 16))
    assert regularizer_state(module) == {
        "sar_gate_open_step": 3,
        "sar_gate_opened": True,
        "sar_steps": 5,
    }
    # without a name, the one in the run's config.yaml
    (tmp_path / "config.yaml").write_text("name: from_config\nseed: 0\n")
    write_run_plots(module, dm, tmp_path, task="classification", outputs=outputs)
    call = tsne_calls[-1]
    assert call["note"] is None
    assert torch.equal(call["anchors"], sar.semantic_anchors)
    assert call["title"] == "from_config: test features and semantic anchors (t-SNE)"
    assert (tmp_path / "plots" / "anchor_similarity.png").is_file()


def test_ema_prototypes_are_drawn_with_the_points(tmp_path: Path, tsne_calls: list[dict]) -> None:
    dm, module = digits_run(["ce", "ema_prototype"])
    outputs = {"features": torch.randn(40, 16), "labels": torch.arange(40) % 10}
    write_run_plots(module, dm, tmp_path, task="classification", outputs=outputs, name="ema")
    call = tsne_calls[-1]
    assert torch.equal(call["anchors"], module.objective.terms[1].prototypes)
    assert call["note"] is None and call["title"] == "ema: test features and EMA prototypes (t-SNE)"


def test_pcl_prototypes_are_drawn_with_the_embedding_they_were_computed_from(
    tmp_path: Path, tsne_calls: list[dict]
) -> None:
    # The E-step clusters embeddings of the momentum encoder: drawn beside the query
    # encoder's embedding, the prototypes were nearer one another than any point and
    # formed one clump away from every point.
    raw = {
        "name": "tiny_pcl",
        "method": "pcl",
        "data": {
            "source": "digits",
            "batch_size": 64,
            "max_train_samples": 128,
            "max_test_samples": 64,
        },
        "model": {"kwargs": {"width": 8, "feat_dim": 16}, "queue_size": 128},
        "cluster": {"num_clusters": [6], "warmup_epochs": 0, "niter": 5},
        "trainer": {"max_epochs": 1, "progress": False},
        "eval": {"tsne": True, "probe_steps": 5},
    }
    cfg = parse_pretrain_config(raw)
    dm, module = build_pretrain_run(cfg)
    moco = module.moco
    with torch.no_grad():  # the momentum encoder lags the query encoder, as in training
        for param in moco.encoder_k.parameters():
            param.add_(0.1 * torch.randn_like(param))
    train = dm.preprocess(dm.labelled_dataset("train").tensors[0])
    embedded = moco.embed(train, momentum=True)
    estep = gather_and_cluster(embedded, torch.arange(len(train)), len(train), [6], niter=5)
    module.set_estep(estep, 0)
    evaluate_pretrained(module, dm, cfg, plot_dir=tmp_path)
    call = tsne_calls[-1]
    test = dm.preprocess(dm.labelled_dataset("test").tensors[0])
    momentum, query = moco.embed(test, momentum=True), moco.embed(test, momentum=False)
    assert torch.allclose(call["features"], momentum, atol=1e-5)
    assert not torch.allclose(call["features"], query, atol=1e-2)
    assert torch.equal(call["anchors"], module.prototypes[0].cpu())
    assert call["title"] == (
        "tiny_pcl: test embedding (momentum encoder)\n"
        "stars = prototypes of the E-step at the start of epoch 0 (k=6)"
    )
    assert call["class_names"] == list(dm.class_names)
    unit = torch.nn.functional.normalize(module.prototypes[0], dim=1)
    mean_cos = float((unit @ unit.T)[~torch.eye(6, dtype=torch.bool)].mean())
    assert (call["note"] is None) == (mean_cos <= 0.99)

    # prototypes of an encoder that had little training sit together: said on the picture
    collapsed = torch.nn.functional.normalize(torch.ones(6, 128) + 0.01 * torch.randn(6, 128))
    estep.prototypes[0].copy_(collapsed)
    module.set_estep(estep, 3)
    evaluate_pretrained(module, dm, cfg, plot_dir=tmp_path)
    call = tsne_calls[-1]
    assert call["title"].endswith("at the start of epoch 3 (k=6)")
    assert re.fullmatch(
        r"prototypes nearly identical \(mean cosine 0\.99\d\d\): the encoder had little "
        r"training at that E-step",
        call["note"],
    )


def test_the_prototype_caption_names_the_estep_and_a_collapse() -> None:
    spread = torch.eye(4)  # orthogonal: mean pairwise cosine 0
    assert prototype_tsne_text(spread, 2) == (
        "prototypes of the E-step at the start of epoch 2",
        None,
    )
    # pairwise cosines (a, b) = 0.9996, (a, c) = 1, (b, c) = 0.9996, mean 0.9997
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([0.9996, (1 - 0.9996**2) ** 0.5])
    caption, note = prototype_tsne_text(torch.stack([a, b, 3 * a]), 0)
    assert caption == "prototypes of the E-step at the start of epoch 0"
    assert note == (
        "prototypes nearly identical (mean cosine 0.9997): the encoder had little training "
        "at that E-step"
    )
    # below the threshold (mean cosine 0.98 <= 0.99) no note; one prototype has no pairs
    c = torch.tensor([0.98, (1 - 0.98**2) ** 0.5])
    assert prototype_tsne_text(torch.stack([a, c]), 1)[1] is None
    assert prototype_tsne_text(a[None], 1)[1] is None


def test_fit_follows_the_eval_section_and_data_max_test_samples(
    tmp_path: Path, tsne_calls: list[dict]
) -> None:
    raw = npz_config(write_npz(tmp_path / "d.npz"))
    raw["data"]["max_test_samples"] = 5
    raw["eval"] = {"tsne_points": 3}
    fit(parse_config(raw), tmp_path / "drawn", quiet=True)
    assert len(tsne_calls) == 1 and tsne_calls[0]["max_points"] == 3
    assert len(tsne_calls[0]["labels"]) == 5  # the test points the run was scored on
    assert tsne_calls[0]["title"].startswith("npz:")

    raw["eval"] = {"plots": False}
    fit(parse_config(raw), tmp_path / "not_drawn", quiet=True)
    assert len(tsne_calls) == 1
    assert not (tmp_path / "not_drawn" / "plots").exists()


# ------------------------------------------------------- too few test points for a picture


def three_class_npz(path: Path) -> Path:
    """8x8 images of 3 classes of 10 images (class ``c`` brighter in row ``c``): the 20 %
    test split holds 2 images of every class."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 10)
    images = rng.integers(0, 100, size=(len(labels), 8, 8)).astype(np.uint8)
    images[np.arange(len(labels)), labels] += 150
    np.savez(path, images=images, labels=labels)
    return path


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted(run_dir.rglob("*.ckpt")) if run_dir.exists() else []


def test_max_test_samples_below_the_test_classes_stops_a_fit_before_training(
    tmp_path: Path,
) -> None:
    # it trained, then failed in the evaluation ("labels must contain at least 2 classes")
    # or in the t-SNE after metrics.json ("features must hold at least 3 points")
    raw = npz_config(three_class_npz(tmp_path / "three.npz"))
    raw["data"]["max_test_samples"] = 2
    run_dir = tmp_path / "run"
    message = r"^data\.max_test_samples=2 is below the 3 classes of the test split of npz:"
    with pytest.raises(ValueError, match=message):
        fit(parse_config(raw), run_dir, quiet=True)
    assert checkpoints(run_dir) == []
    assert not (run_dir / "metrics.json").exists()


def test_cli_fit_with_one_test_sample_is_refused_before_training(tmp_path: Path, capsys) -> None:
    import yaml

    from anchorlearn.cli import main

    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(npz_config(write_npz(tmp_path / "d.npz"))))
    out = tmp_path / "run"
    args = ["fit", "--config", str(config), "--out", str(out)]
    assert main([*args, "--set", "data.max_test_samples=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "anchorlearn: error: data.max_test_samples must be >= 2, got 1"
    assert checkpoints(out) == []


def test_a_run_scored_on_two_test_points_is_finished_without_a_tsne(tmp_path: Path, capsys) -> None:
    # the fixture's test split holds 2 classes: 2 test images pass, too few for a t-SNE
    raw = npz_config(write_npz(tmp_path / "d.npz"))
    raw["data"]["max_test_samples"] = 2
    run_dir = tmp_path / "run"
    metrics = fit(parse_config(raw), run_dir, quiet=True)
    assert metrics is not None and (run_dir / "metrics.json").is_file()
    assert checkpoints(run_dir)
    assert not (run_dir / "plots" / "tsne.png").exists()
    assert (run_dir / "plots" / "training_curves.png").is_file()  # the other plots are drawn
    notes = [line for line in capsys.readouterr().err.splitlines() if "t-SNE" in line]
    assert notes == [
        "anchorlearn: note: no t-SNE picture: 2 test points, it needs at least 3 "
        "(metrics.json is written)"
    ]


def test_write_run_plots_skips_a_tsne_of_too_few_points(tmp_path: Path, capsys) -> None:
    dm, module = build_run(parse_config(npz_config(write_npz(tmp_path / "d.npz"))))
    outputs = {"features": torch.randn(2, 8), "labels": torch.tensor([0, 1])}
    write_run_plots(module, dm, tmp_path, task="classification", outputs=outputs, name="few")
    assert not (tmp_path / "plots" / "tsne.png").exists()
    assert capsys.readouterr().err == (
        "anchorlearn: note: no t-SNE picture: 2 test points, it needs at least 3 "
        "(metrics.json is written)\n"
    )


def test_anchors_count_towards_the_points_of_a_tsne(
    tmp_path: Path, tsne_calls: list[dict], capsys
) -> None:
    dm, module = digits_run(["ce", "ema_prototype"])
    outputs = {"features": torch.randn(2, 16), "labels": torch.tensor([0, 1])}
    write_run_plots(module, dm, tmp_path, task="classification", outputs=outputs, name="ema")
    assert len(tsne_calls) == 1 and len(tsne_calls[0]["anchors"]) == 10
    assert capsys.readouterr().err == ""
