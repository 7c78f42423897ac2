"""Plots for the experiments: t-SNE of features with anchors, per-class bars of several
methods, anchor cosine heatmaps and training curves.

Every function writes a PNG to ``path`` (parent folders are created) and returns the path.
Figures are built with matplotlib's object-oriented API and rendered by Agg, without
pyplot: no backend is switched, no global figure state is touched, no window opens.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure

__all__ = ["plot_anchor_similarity", "plot_per_class", "plot_training_curves", "plot_tsne"]

ArrayLike = torch.Tensor | np.ndarray


def _to_numpy(values: object, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    if isinstance(values, np.ndarray):
        return values
    raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(values).__name__}")


def _save(fig: Figure, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    return out


def plot_tsne(
    features: ArrayLike,
    labels: ArrayLike,
    path: str | Path,
    anchors: ArrayLike | None = None,
    max_points: int = 2000,
    perplexity: float = 30.0,
    seed: int = 0,
    title: str | None = None,
    anchors_are_classes: bool = True,
) -> Path:
    """t-SNE of ``features`` ``(N, D)`` coloured by ``labels`` ``(N,)``.

    At most ``max_points`` samples are drawn at random (seeded). ``anchors`` ``(C, D)`` are
    embedded jointly with the samples and drawn as stars: in their class colour when row
    ``c`` belongs to class ``c`` (``anchors_are_classes``, e.g. SAR's anchors), white
    otherwise (e.g. k-means prototypes, which are not classes). The perplexity is lowered
    to fit small inputs; points that are all identical (a collapsed embedding) start from
    a random layout, as PCA has no direction to start from.
    """
    from sklearn.manifold import TSNE

    feats = _to_numpy(features, "features")
    labs = _to_numpy(labels, "labels")
    if feats.ndim != 2 or labs.shape != feats.shape[:1]:
        raise ValueError(
            f"features must be (N, D) and labels (N,), got {feats.shape} and {labs.shape}"
        )
    if max_points < 2:
        raise ValueError(f"max_points must be >= 2, got {max_points}")
    rng = np.random.default_rng(seed)
    if len(feats) > max_points:
        keep = rng.choice(len(feats), size=max_points, replace=False)
        feats, labs = feats[keep], labs[keep]
    points = feats.astype(np.float64)
    num_anchors = 0
    if anchors is not None:
        anchor_array = _to_numpy(anchors, "anchors").astype(np.float64)
        if anchor_array.ndim != 2 or anchor_array.shape[1] != feats.shape[1]:
            raise ValueError(
                f"anchors must have shape (C, {feats.shape[1]}), got {anchor_array.shape}"
            )
        num_anchors = len(anchor_array)
        points = np.concatenate([points, anchor_array])
    if len(points) < 3:
        raise ValueError(f"features must hold at least 3 points in all, got {len(points)}")
    if not np.isfinite(points).all():
        raise ValueError("features and anchors must be finite to plot a t-SNE, got NaN or inf")
    # PCA initialisation divides by the spread of the first component (0 for identical points)
    spread = bool(np.ptp(points, axis=0).max() > 0)
    tsne = TSNE(
        n_components=2,
        perplexity=min(perplexity, (len(points) - 1) / 3),
        init="pca" if spread else "random",
        random_state=seed,
    )
    embedded = tsne.fit_transform(points)
    num_groups = int(labs.max(initial=0)) + 1
    if anchors_are_classes:
        num_groups = max(num_groups, num_anchors)
    cmap = matplotlib.colormaps["tab20" if num_groups > 10 else "tab10"]
    num_colours = cmap.N
    fig = Figure(figsize=(6, 6))
    ax = fig.subplots()
    samples = embedded[: len(feats)]
    ax.scatter(
        samples[:, 0],
        samples[:, 1],
        c=labs % num_colours,
        cmap=cmap,
        s=4,
        vmin=0,
        vmax=num_colours - 1,
    )
    if num_anchors:
        stars = embedded[len(feats) :]
        if anchors_are_classes:
            colour = {"c": np.arange(num_anchors) % num_colours, "cmap": cmap}
            colour.update(vmin=0, vmax=num_colours - 1)
        else:
            colour = {"c": "white"}
        ax.scatter(stars[:, 0], stars[:, 1], marker="*", s=250, edgecolors="black", **colour)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_per_class(
    values: Mapping[str, Sequence[float] | ArrayLike],
    path: str | Path,
    class_names: Sequence[str] | None = None,
    ylabel: str = "accuracy",
    title: str | None = None,
) -> Path:
    """Grouped bar chart: one group per class, one bar per method.

    ``values`` maps a method name to its ``C`` per-class values (accuracy or IoU; NaN bars
    are left empty). ``class_names`` defaults to the class indices.
    """
    if not isinstance(values, Mapping) or not values:
        raise ValueError(
            f"values must be a non-empty mapping method -> per-class values, got {values!r}"
        )
    rows = {name: np.asarray(_as_list(v), dtype=np.float64) for name, v in values.items()}
    lengths = {len(v) for v in rows.values()}
    if len(lengths) != 1:
        raise ValueError(f"values must all have the same number of classes, got lengths {lengths}")
    num_classes = lengths.pop()
    names = [str(c) for c in range(num_classes)] if class_names is None else list(class_names)
    if len(names) != num_classes:
        raise ValueError(f"class_names must have {num_classes} entries, got {len(names)}")
    width = 0.8 / len(rows)
    x = np.arange(num_classes)
    fig = Figure(figsize=(max(6.0, 0.5 * num_classes * len(rows)), 4))
    ax = fig.subplots()
    for i, (method, vals) in enumerate(rows.items()):
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, vals, width, label=method)
    ax.set_xticks(
        x,
        names,
        rotation=45 if num_classes > 10 else 0,
        ha="right" if num_classes > 10 else "center",
    )
    ax.set_ylabel(ylabel)
    ax.legend()
    if title:
        ax.set_title(title)
    return _save(fig, path)


def _as_list(values: object) -> list[float]:
    if isinstance(values, torch.Tensor | np.ndarray):
        return [float(v) for v in _to_numpy(values, "values").reshape(-1)]
    if isinstance(values, Sequence) and not isinstance(values, str):
        return [float(v) for v in values]
    raise TypeError(f"values entries must be sequences of numbers, got {type(values).__name__}")


def plot_anchor_similarity(
    anchors: ArrayLike,
    path: str | Path,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Heatmap of the ``C x C`` cosine similarities between the rows of ``anchors`` ``(C, D)``."""
    array = _to_numpy(anchors, "anchors").astype(np.float64)
    if array.ndim != 2 or len(array) < 2:
        raise ValueError(f"anchors must have shape (C, D) with C >= 2, got {array.shape}")
    unit = array / np.maximum(np.linalg.norm(array, axis=1, keepdims=True), 1e-12)
    cos = unit @ unit.T
    fig = Figure(figsize=(5, 4.5))
    ax = fig.subplots()
    image = ax.imshow(cos, cmap="RdBu_r", vmin=-1, vmax=1)
    fig.colorbar(image, ax=ax, label="cosine")
    if class_names is not None:
        if len(class_names) != len(array):
            raise ValueError(f"class_names must have {len(array)} entries, got {len(class_names)}")
        ax.set_xticks(range(len(array)), class_names, rotation=90)
        ax.set_yticks(range(len(array)), class_names)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def _read_metrics_csv(path: Path) -> list[dict[str, float]]:
    rows = []
    with path.open(newline="") as handle:
        for raw in csv.DictReader(handle):
            row = {}
            for key, value in raw.items():
                if key is None or value in (None, ""):
                    continue
                try:
                    row[key] = float(value)
                except ValueError:
                    continue
            rows.append(row)
    return rows


def plot_training_curves(
    history: Sequence[Mapping[str, float]] | str | Path,
    path: str | Path,
    metrics: Sequence[str] | None = None,
    x: str = "epoch",
) -> Path:
    """One panel per metric against ``x`` (``"epoch"`` or ``"step"``).

    ``history`` is a list of dicts (one per logged row) or the path of a Lightning
    ``CSVLogger`` ``metrics.csv``, where train and validation metrics sit on different rows
    with empty cells elsewhere; missing values are skipped. ``metrics`` defaults to every
    column except ``epoch`` and ``step``. Rows without ``x`` use their row index.
    """
    if isinstance(history, str | Path):
        csv_path = Path(history)
        if not csv_path.is_file():
            raise ValueError(f"history must be an existing CSV file, got {str(csv_path)!r}")
        rows = _read_metrics_csv(csv_path)
    elif isinstance(history, Sequence):
        rows = [dict(row) for row in history]
    else:
        raise TypeError(
            f"history must be a list of dicts or a CSV path, got {type(history).__name__}"
        )
    columns = list(dict.fromkeys(key for row in rows for key in row))
    names = [c for c in columns if c not in ("epoch", "step")] if metrics is None else list(metrics)
    missing = [m for m in names if m not in columns]
    if missing or not names:
        raise ValueError(f"metrics must be among the logged columns {columns}, got {names}")
    ncols = min(3, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig = Figure(figsize=(4 * ncols, 3 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        points = [(row.get(x, float(i)), row[name]) for i, row in enumerate(rows) if name in row]
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3)
        ax.set_title(name)
        ax.set_xlabel(x)
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)
