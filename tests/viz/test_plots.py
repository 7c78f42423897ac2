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
    plots,
)
from anchorlearn.viz.plots import embed_2d, subsample_by_class

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


def _clusters(per_class: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three well separated Gaussian clusters in ``dim`` dimensions."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), per_class)
    centres = rng.normal(size=(3, dim)) * (30 / np.sqrt(dim))  # norm about 30
    return centres[labels] + rng.normal(size=(len(labels), dim)), labels


def test_embed_2d_places_a_class_mean_among_the_points_of_its_class() -> None:
    features, labels = _clusters(40, 720)
    means = np.stack([features[labels == c].mean(0) for c in range(3)])
    points, extra = embed_2d(features, means, seed=0)
    assert points.shape == (120, 2) and extra.shape == (3, 2)
    for c in range(3):
        nearest = np.argsort(np.linalg.norm(points - extra[c], axis=1))[:10]
        assert (labels[nearest] == c).all()
    alone, none = embed_2d(features, seed=0)
    assert alone.shape == (120, 2) and none.shape == (0, 2)


def test_embed_2d_reduces_wide_features_with_pca_before_tsne(monkeypatch) -> None:
    from sklearn.manifold import TSNE

    seen = []
    original = TSNE.fit_transform

    def spy(self, x, *args, **kwargs):
        seen.append((x.shape, self.max_iter, self.init, self.learning_rate))
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(TSNE, "fit_transform", spy)
    features, _ = _clusters(30, 720)
    embed_2d(features, features[:2])
    embed_2d(features[:, :20])
    assert seen == [((92, 50), 500, "pca", "auto"), ((90, 20), 500, "pca", "auto")]


def test_subsample_by_class_keeps_every_point_of_rare_classes() -> None:
    labels = np.array([0] * 1000 + [1] * 3 + [2] * 50)
    keep = subsample_by_class(labels, 100, seed=0)
    assert len(keep) == 100 == len(np.unique(keep))
    counts = np.bincount(labels[keep], minlength=3)
    assert counts[1] == 3 and {int(counts[0]), int(counts[2])} <= {48, 49}
    assert (keep == subsample_by_class(labels, 100, seed=0)).all()
    assert (subsample_by_class(labels[:20], 100) == np.arange(20)).all()
    with pytest.raises(ValueError, match="max_points must be >= 2, got 1"):
        subsample_by_class(labels, 1)


def _figure_of(monkeypatch) -> list:
    """The figures plots writes, instead of writing them."""
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or Path(path))
    return figures


def test_tsne_has_a_legend_of_class_names_a_title_and_a_note(monkeypatch) -> None:
    figures = _figure_of(monkeypatch)
    features, labels = _clusters(10, 8)
    plot_tsne(
        features,
        labels,
        "t.png",
        class_names=["cat", "dog", "eel"],
        title="run7: test features (t-SNE)",
        note="SAR gate never opened: no semantic anchors",
    )
    ax = figures[-1].axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["cat", "dog", "eel"]
    assert ax.get_title() == "run7: test features (t-SNE)"
    assert [t.get_text() for t in ax.texts] == ["SAR gate never opened: no semantic anchors"]
    long_note = (
        "prototypes nearly identical (mean cosine 0.9997): the encoder had little training "
        "at that E-step"
    )
    plot_tsne(features, labels, "n.png", note=long_note)
    (text,) = figures[-1].axes[0].texts
    lines = text.get_text().split("\n")
    assert len(lines) == 2 and max(map(len, lines)) <= 60  # wrapped to the axes' width
    assert " ".join(lines) == long_note
    plot_tsne(features, labels, "u.png")  # no names: the class indices
    assert [t.get_text() for t in figures[-1].axes[0].get_legend().get_texts()] == ["0", "1", "2"]
    many = np.arange(30) % 25  # more classes than a legend can hold
    plot_tsne(np.random.default_rng(0).normal(size=(30, 4)), many, "v.png")
    assert figures[-1].axes[0].get_legend() is None
    with pytest.raises(ValueError, match="class_names must have at least 3 entries, got 2"):
        plot_tsne(features, labels, "w.png", class_names=["cat", "dog"])


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


def test_tsne_min_points_is_the_fewest_rows_a_tsne_is_drawn_of(tmp_path: Path) -> None:
    n = plots.TSNE_MIN_POINTS
    assert n == 3
    assert _is_png(plot_tsne(torch.randn(n, 4), torch.arange(n) % 2, tmp_path / "a.png"))
    # anchors count: two points and one anchor are three rows
    two, labels = torch.randn(n - 1, 4), torch.arange(n - 1)
    assert _is_png(plot_tsne(two, labels, tmp_path / "b.png", anchors=torch.ones(1, 4)))
    with pytest.raises(ValueError, match=rf"^features must hold at least {n} points in all"):
        plot_tsne(two, labels, tmp_path / "c.png")
    with pytest.raises(ValueError, match=rf"^points and extra must hold at least {n} rows"):
        embed_2d(two)
