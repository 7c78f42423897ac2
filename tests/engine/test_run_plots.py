"""The t-SNE pictures of a run: what is drawn with the points, the titles and the notes (the
drawing itself is replaced by a recorder: tests/viz/test_plots.py tests it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.engine.runfixtures import npz_config, write_npz

from anchorlearn.cluster import gather_and_cluster
from anchorlearn.engine.config import parse_config
from anchorlearn.engine.evaluate import regularizer_state, write_run_plots
from anchorlearn.engine.runner import build_run, fit
from anchorlearn.engine.ssl_config import parse_pretrain_config
from anchorlearn.engine.ssl_evaluate import evaluate_pretrained
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
    assert call["title"].startswith("tiny_pcl: ") and "E-step prototypes" in call["title"]
    assert call["class_names"] == list(dm.class_names)


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
