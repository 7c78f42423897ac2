import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from anchorlearn.viz import (
    plot_anchor_similarity,
    plot_per_class,
    plot_training_curves,
    plot_tsne,
)

PNG_MAGIC = b"\x89PNG"


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:4] == PNG_MAGIC


def test_tsne_with_anchors(tmp_path: Path) -> None:
    labels = torch.arange(3).repeat(12)
    features = torch.randn(36, 8) + 4 * torch.eye(3, 8)[labels]
    out = plot_tsne(features, labels, tmp_path / "sub" / "tsne.png", anchors=torch.eye(3, 8) * 4)
    assert out == tmp_path / "sub" / "tsne.png" and _is_png(out)


def test_tsne_prototypes_that_are_not_classes_get_one_neutral_colour(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    calls = []
    original = Axes.scatter

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "scatter", spy)
    labels = torch.arange(3).repeat(12)
    features = torch.randn(36, 8) + 4 * torch.eye(3, 8)[labels]
    prototypes = torch.randn(7, 8)  # 7 clusters of 3 classes
    plot_tsne(features, labels, tmp_path / "a.png", anchors=prototypes, anchors_are_classes=False)
    assert calls[-1]["c"] == "white" and calls[-1]["marker"] == "*"
    plot_tsne(features, labels, tmp_path / "b.png", anchors=torch.eye(3, 8) * 4)
    assert list(calls[-1]["c"]) == [0, 1, 2]


def test_tsne_of_a_collapsed_embedding_is_drawn(tmp_path: Path) -> None:
    # identical points: the PCA initialisation of scikit-learn's t-SNE divides by zero
    out = plot_tsne(np.zeros((50, 16)), np.arange(50) % 10, tmp_path / "z.png")
    assert _is_png(out)
    with pytest.raises(ValueError, match="must be finite"):
        plot_tsne(np.full((10, 4), np.nan), np.zeros(10), tmp_path / "n.png")


def test_tsne_subsamples(tmp_path: Path) -> None:
    out = plot_tsne(
        np.random.default_rng(0).normal(size=(60, 4)),
        np.arange(60) % 12,
        tmp_path / "t.png",
        max_points=20,
    )
    assert _is_png(out)


def test_per_class_bars(tmp_path: Path) -> None:
    values = {"baseline": [0.9, 0.5, 0.1], "sar": torch.tensor([0.9, 0.6, float("nan")])}
    out = plot_per_class(values, tmp_path / "bars.png", class_names=["a", "b", "c"])
    assert _is_png(out)


def test_anchor_heatmap(tmp_path: Path) -> None:
    assert _is_png(plot_anchor_similarity(torch.randn(5, 4), tmp_path / "h.png", list("abcde")))


def test_training_curves_from_dicts_and_lightning_csv(tmp_path: Path) -> None:
    history = [{"epoch": e, "train_loss": 1 / (e + 1), "val_acc": e / 5} for e in range(5)]
    assert _is_png(plot_training_curves(history, tmp_path / "a.png"))
    csv_path = tmp_path / "metrics.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "step", "train_loss", "val_acc"])
        for epoch in range(3):
            writer.writerow([epoch, 10 * epoch + 9, 1.0 / (epoch + 1), ""])
            writer.writerow([epoch, 10 * epoch + 9, "", 0.5 + 0.1 * epoch])
    out = plot_training_curves(csv_path, tmp_path / "b.png", metrics=["val_acc"], x="step")
    assert _is_png(out)


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="anchors must have shape"):
        plot_tsne(torch.randn(10, 4), torch.zeros(10), tmp_path / "x.png", anchors=torch.ones(2, 3))
    with pytest.raises(TypeError, match="features"):
        plot_tsne([[0.0]], torch.zeros(1), tmp_path / "x.png")
    with pytest.raises(ValueError, match="same number of classes"):
        plot_per_class({"a": [1.0], "b": [1.0, 2.0]}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="metrics must be among"):
        plot_training_curves([{"epoch": 0, "loss": 1.0}], tmp_path / "x.png", metrics=["acc"])
    with pytest.raises(ValueError, match="history must be an existing CSV"):
        plot_training_curves(tmp_path / "missing.csv", tmp_path / "x.png")
