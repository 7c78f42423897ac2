"""Plots for the experiments: t-SNE of features with anchors, per-class bars of several
methods, anchor cosine heatmaps and training curves.

Every ``plot_*`` function writes a PNG to ``path`` (parent folders are created) and returns
the path; :func:`embed_2d` (the joint t-SNE) and :func:`subsample_by_class` are the steps of
:func:`plot_tsne` on their own.
Figures are built with matplotlib's object-oriented API and rendered by Agg, without
pyplot: no backend is switched, no global figure state is touched, no window opens.
"""

from __future__ import annotations

import csv
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

__all__ = [
    "LEGEND_MAX_CLASSES",
    "TSNE_MAX_ITER",
    "TSNE_MIN_POINTS",
    "TSNE_PCA_DIMS",
    "embed_2d",
    "plot_anchor_similarity",
    "plot_per_class",
    "plot_training_curves",
    "plot_tsne",
    "subsample_by_class",
]

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


# t-SNE of the few thousand points drawn here: features wider than this are first reduced
# by PCA, and 500 iterations (scikit-learn's default is 1,000) settle such small inputs.
TSNE_PCA_DIMS = 50
TSNE_MAX_ITER = 500
# a t-SNE of fewer rows (points and anchors together) is refused: two rows only ever land
# at two opposite places, which shows nothing of the features
TSNE_MIN_POINTS = 3
# a t-SNE's note is wrapped to lines of at most this many characters (the axes' width)
_NOTE_WIDTH = 60
# a legend names the classes of a t-SNE up to this many classes (tab20 has 20 colours)
LEGEND_MAX_CLASSES = 20


def _rows(values: object, name: str, dim: int | None = None) -> np.ndarray:
    """``values`` as a float64 ``(N, D)`` array (``D == dim`` when given)."""
    array = _to_numpy(values, name).astype(np.float64)
    if array.ndim != 2 or (dim is not None and array.shape[1] != dim):
        expected = "(N, D)" if dim is None else f"(C, {dim})"
        raise ValueError(f"{name} must have shape {expected}, got {array.shape}")
    return array


def subsample_by_class(labels: ArrayLike, max_points: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most ``max_points`` of the ``labels`` ``(N,)``, as evenly spread
    over the classes as the classes allow, so that rare classes are drawn too.

    Every class keeps ``min(n_c, q)`` samples, ``q`` the largest share that fits; the few
    places left go to randomly chosen classes that have more. Drawn with ``seed``; all
    indices when ``N <= max_points``.
    """
    labs = _to_numpy(labels, "labels")
    if labs.ndim != 1:
        raise ValueError(f"labels must have shape (N,), got {labs.shape}")
    if max_points < 2:
        raise ValueError(f"max_points must be >= 2, got {max_points}")
    if len(labs) <= max_points:
        return np.arange(len(labs))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labs, return_counts=True)
    remaining, share = max_points, max_points
    for i, count in enumerate(np.sort(counts)):
        share = remaining // (len(counts) - i)
        if count > share:
            break
        remaining -= int(count)
    quota = np.minimum(counts, share)
    larger = np.flatnonzero(counts > quota)
    extra = rng.choice(larger, size=max_points - int(quota.sum()), replace=False)
    quota[extra] += 1
    keep = [
        rng.choice(np.flatnonzero(labs == c), size=int(q), replace=False)
        for c, q in zip(classes, quota, strict=True)
    ]
    return np.sort(np.concatenate(keep))


def embed_2d(
    points: ArrayLike,
    extra: ArrayLike | None = None,
    *,
    perplexity: float = 30.0,
    seed: int = 0,
    max_iter: int = TSNE_MAX_ITER,
    pca_dims: int = TSNE_PCA_DIMS,
) -> tuple[np.ndarray, np.ndarray]:
    """One t-SNE of ``points`` ``(N, D)`` and ``extra`` ``(M, D)`` (anchors, prototypes)
    together; returns their 2-D positions ``(N, 2)`` and ``(M, 2)``.

    The extra rows take part in the fit like any point, so each lands among the points it
    is near in ``D`` dimensions. Features wider than ``pca_dims`` are first projected on
    their ``pca_dims`` principal components (fitted on all rows). The perplexity is lowered
    to fit small inputs; identical points (a collapsed embedding) start from a random
    layout, as PCA has no direction to start from.
    """
    from sklearn.manifold import TSNE

    data = _rows(points, "points")
    more = np.zeros((0, data.shape[1])) if extra is None else _rows(extra, "extra", data.shape[1])
    if max_iter < 250:
        raise ValueError(f"max_iter must be >= 250 (scikit-learn's minimum), got {max_iter}")
    if pca_dims < 2:
        raise ValueError(f"pca_dims must be >= 2, got {pca_dims}")
    rows = np.concatenate([data, more])
    if len(rows) < TSNE_MIN_POINTS:
        raise ValueError(
            f"points and extra must hold at least {TSNE_MIN_POINTS} rows in all, got {len(rows)}"
        )
    if not np.isfinite(rows).all():
        raise ValueError("points and extra must be finite to embed, got NaN or inf")
    # PCA initialisation divides by the spread of the first component (0 for identical points)
    spread = bool(np.ptp(rows, axis=0).max() > 0)
    if spread and rows.shape[1] > pca_dims and len(rows) > pca_dims:
        from sklearn.decomposition import PCA

        rows = PCA(n_components=pca_dims, random_state=seed).fit_transform(rows)
    tsne = TSNE(
        n_components=2,
        perplexity=min(perplexity, (len(rows) - 1) / 3),
        init="pca" if spread else "random",
        learning_rate="auto",
        max_iter=max_iter,
        random_state=seed,
    )
    embedded = tsne.fit_transform(rows)
    return embedded[: len(data)], embedded[len(data) :]


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
    class_names: Sequence[str] | None = None,
    note: str | None = None,
) -> Path:
    """t-SNE (:func:`embed_2d`) of ``features`` ``(N, D)`` coloured by ``labels`` ``(N,)``.

    At most ``max_points`` samples are drawn, spread over the classes
    (:func:`subsample_by_class`). ``anchors`` ``(C, D)`` are embedded jointly with the
    samples and drawn as stars: in their class colour when row ``c`` belongs to class ``c``
    (``anchors_are_classes``, e.g. SAR's anchors), white otherwise (e.g. k-means
    prototypes, which are not classes). A legend names the classes drawn (``class_names``,
    indexed by label, else the labels) when there are at most
    :data:`LEGEND_MAX_CLASSES`. ``note`` is written in a box at the top of the plot (e.g.
    why there are no anchors), wrapped to lines of at most 60 characters.
    """
    feats = _to_numpy(features, "features")
    labs = _to_numpy(labels, "labels")
    if feats.ndim != 2 or labs.shape != feats.shape[:1]:
        raise ValueError(
            f"features must be (N, D) and labels (N,), got {feats.shape} and {labs.shape}"
        )
    keep = subsample_by_class(labs, max_points, seed)
    feats, labs = feats[keep], labs[keep].astype(np.int64)
    anchor_rows = None if anchors is None else _rows(anchors, "anchors", feats.shape[1])
    num_anchors = 0 if anchor_rows is None else len(anchor_rows)
    if len(feats) + num_anchors < TSNE_MIN_POINTS:
        raise ValueError(
            f"features must hold at least {TSNE_MIN_POINTS} points in all, "
            f"got {len(feats) + num_anchors}"
        )
    if not (np.isfinite(feats).all() and (anchor_rows is None or np.isfinite(anchor_rows).all())):
        raise ValueError("features and anchors must be finite to plot a t-SNE, got NaN or inf")
    present = np.unique(labs)
    if class_names is not None and len(class_names) <= int(labs.max(initial=0)):
        raise ValueError(
            f"class_names must have at least {int(labs.max(initial=0)) + 1} entries, "
            f"got {len(class_names)}"
        )
    samples, stars = embed_2d(feats, anchor_rows, perplexity=perplexity, seed=seed)
    num_groups = int(labs.max(initial=0)) + 1
    if anchors_are_classes:
        num_groups = max(num_groups, num_anchors)
    cmap = matplotlib.colormaps["tab20" if num_groups > 10 else "tab10"]
    num_colours = cmap.N
    fig = Figure(figsize=(6, 6))
    ax = fig.subplots()
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
        if anchors_are_classes:
            colour = {"c": np.arange(num_anchors) % num_colours, "cmap": cmap}
            colour.update(vmin=0, vmax=num_colours - 1)
        else:
            colour = {"c": "white"}
        ax.scatter(stars[:, 0], stars[:, 1], marker="*", s=250, edgecolors="black", **colour)
    if len(present) <= LEGEND_MAX_CLASSES:
        names = [str(c) if class_names is None else str(class_names[c]) for c in present]
        handles = [
            Line2D([], [], marker="o", linestyle="", color=cmap(int(c) % num_colours), label=n)
            for c, n in zip(present, names, strict=True)
        ]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    if note:
        ax.text(
            0.5,
            0.98,
            textwrap.fill(note, _NOTE_WIDTH),
            transform=ax.transAxes,
            ha="center",
            va="top",
            fontsize="small",
            bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "0.6"},
        )
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
