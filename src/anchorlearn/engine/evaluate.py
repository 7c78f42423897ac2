"""Evaluation of a trained module on its test (or validation) split: metrics, feature
geometry and pictures."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from anchorlearn.data.long_tail import shot_groups
from anchorlearn.losses.sar import SemanticAnchorRegularizer
from anchorlearn.metrics.classification import classification_report, per_class_accuracy
from anchorlearn.metrics.geometry import class_centers, feature_geometry
from anchorlearn.metrics.segmentation import SegmentationIoU

from .module import SupervisedModule, training_counts, upsample_logits

__all__ = [
    "SPLITS",
    "collect_outputs",
    "evaluate_module",
    "reference_points",
    "regularizer_state",
    "shut_gate_note",
    "write_run_plots",
]

SPLITS = ("test", "val")

# Dense features are subsampled to this many labelled positions for the geometry metrics.
_MAX_GEOMETRY_POINTS = 20_000


@torch.no_grad()
def collect_outputs(
    module: SupervisedModule,
    dm: Any,
    *,
    max_points: int = _MAX_GEOMETRY_POINTS,
    seed: int = 0,
    split: str = "test",
) -> dict[str, Any]:
    """Run ``module`` in eval mode over the ``split`` (``"test"`` or ``"val"``) of ``dm``.

    Classification: logits, features ``(N, D)`` and labels. Segmentation: an accumulated
    :class:`SegmentationIoU` plus up to ``max_points`` labelled feature positions.
    """
    was_training = module.training
    module.eval()
    device = module.device
    task = module.task
    generator = torch.Generator().manual_seed(seed)
    logits_all, feats_all, labels_all = [], [], []
    iou = (
        SegmentationIoU(module.num_classes, module.ignore_index)
        if task != "classification"
        else None
    )
    loader = _split_loader(dm, split)
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        if task == "classification":
            images = dm.preprocess(images)
        else:
            images, labels = dm.preprocess(images, labels)
        logits, feats = module.model(images)
        if iou is None:
            logits_all.append(logits.float().cpu())
            feats_all.append(feats.float().cpu())
            labels_all.append(labels.cpu())
            continue
        iou.update(upsample_logits(logits, labels).float().cpu(), labels.cpu())
        small = torch.nn.functional.interpolate(
            labels[:, None].double(), size=feats.shape[-2:], mode="nearest"
        )[:, 0].long()
        flat_feats = feats.float().permute(0, 2, 3, 1).reshape(-1, feats.shape[1]).cpu()
        flat_labels = small.reshape(-1).cpu()
        keep = torch.nonzero(flat_labels != module.ignore_index).flatten()
        per_batch = max(max_points // max(len(loader), 1), 1)
        if keep.numel() > per_batch:
            keep = keep[torch.randperm(keep.numel(), generator=generator)[:per_batch]]
        feats_all.append(flat_feats[keep])
        labels_all.append(flat_labels[keep])
    module.train(was_training)
    out: dict[str, Any] = {"features": torch.cat(feats_all), "labels": torch.cat(labels_all)}
    if iou is None:
        out["logits"] = torch.cat(logits_all)
    else:
        out["iou"] = iou
    return out


def _split_loader(dm: Any, split: str) -> Any:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return dm.test_dataloader() if split == "test" else dm.val_dataloader()


def evaluate_module(
    module: SupervisedModule, dm: Any, *, task: str, split: str = "test"
) -> dict[str, Any]:
    """Metrics on ``split`` (``"test"``, or ``"val"`` to select settings without looking at
    the test split): accuracy groups or IoU groups, plus feature geometry and class
    centres. The many / medium / few groups always come from the training counts."""
    outputs = collect_outputs(module, dm, split=split)
    counts = np.asarray(training_counts(dm))
    names = list(dm.class_names)
    metrics: dict[str, Any] = {}
    if task == "classification":
        groups = shot_groups(counts)
        preds = outputs["logits"].argmax(1)
        report = classification_report(preds, outputs["labels"], module.num_classes, groups)
        metrics.update({k.removeprefix("acc_"): v for k, v in report.items()})
        per_class = per_class_accuracy(preds, outputs["labels"], module.num_classes)
        metrics["per_class"] = {n: _num(v) for n, v in zip(names, per_class.tolist(), strict=True)}
        metrics["groups"] = {names[c]: g for c, g in groups.items()}
    else:
        groups = segmentation_groups(counts)
        iou = outputs["iou"]
        iou.class_to_group = [groups[c] for c in range(module.num_classes)]
        result = iou.compute()
        metrics["miou"] = result["miou"]
        for key, value in result.items():
            if key.startswith("miou_"):
                metrics[key.removeprefix("miou_") + "_iou"] = _num(value)
        metrics["per_class"] = {
            n: _num(v) for n, v in zip(names, result["iou"].tolist(), strict=True)
        }
        metrics["groups"] = {names[c]: g for c, g in groups.items()}
    geometry = feature_geometry(outputs["features"], outputs["labels"])
    metrics.update({k: _num(v) for k, v in geometry.items()})
    metrics.update(regularizer_state(module))
    centers = class_centers(outputs["features"], outputs["labels"])
    metrics["class_centers"] = centers.tolist()
    # which class each row is: a class absent from the (sub)sample has no row
    metrics["class_center_labels"] = torch.unique(outputs["labels"]).tolist()
    return metrics


def regularizer_state(module: SupervisedModule) -> dict[str, int | bool]:
    """For every SAR term ``name``: ``{name}_gate_open_step``, the step its gate first
    opened (-1: never); ``{name}_gate_opened``, whether it ever did (``False``: the pull was
    never active and there are no semantic anchors); ``{name}_steps``, the training steps it
    has seen. With ``gate="per_class"`` the first two are about the first class to open,
    and ``{name}_classes_open`` (how many of the ``C`` classes have opened) and
    ``{name}_all_open_step`` (the step the last one opened, -1 while any is shut) follow."""
    state: dict[str, int | bool] = {}
    for name, term in zip(module.objective.names, module.objective.terms, strict=True):
        if isinstance(term, SemanticAnchorRegularizer):
            state[f"{name}_gate_open_step"] = int(term.gate_open_step)
            state[f"{name}_gate_opened"] = term.gate_ever_opened
            state[f"{name}_steps"] = int(term.step)
            if term.gate == "per_class":
                opened = term.class_open_step
                state[f"{name}_classes_open"] = int((opened >= 0).sum())
                state[f"{name}_all_open_step"] = (
                    int(opened.max()) if bool((opened >= 0).all()) else -1
                )
    return state


def shut_gate_note(module: SupervisedModule) -> str | None:
    """``"SAR gate never opened: no semantic anchors"`` (naming the terms when there are
    several, or one not called ``sar``) when a SAR term's gate never opened; for a
    per-class gate with some classes still shut, ``"SAR gate: k of C classes never opened:
    no semantic anchors drawn"``; else ``None``."""
    shut, partial = [], []
    for name, term in zip(module.objective.names, module.objective.terms, strict=True):
        if not isinstance(term, SemanticAnchorRegularizer):
            continue
        if not term.gate_ever_opened:
            shut.append(name)
        elif term.gate == "per_class" and not bool(term.classes_ready.all()):
            never = int((~term.classes_ready).sum())
            partial.append(f"{never} of {term.num_classes} classes never opened")
    if shut:
        which = "" if shut == ["sar"] else f" ({', '.join(shut)})"
        return f"SAR gate never opened{which}: no semantic anchors"
    if partial:
        return f"SAR gate: {'; '.join(partial)}: no semantic anchors drawn"
    return None


def segmentation_groups(pixel_counts: np.ndarray) -> dict[int, str]:
    """Class 0 is ``background``; item classes split into ``head`` (the more frequent half in
    training pixels) and ``tail`` (the rest)."""
    order = np.argsort(-pixel_counts[1:], kind="stable") + 1
    half = math.ceil(len(order) / 2)
    groups = {0: "background"}
    groups.update({int(c): "head" for c in order[:half]})
    groups.update({int(c): "tail" for c in order[half:]})
    return groups


def reference_points(module: SupervisedModule) -> tuple[str, torch.Tensor] | None:
    """The class anchors or prototypes of the first loss term that has them (its
    ``reference_points()``: a name and a ``(C, D)`` float32 CPU tensor), if any."""
    for term in module.objective.terms:
        points = getattr(term, "reference_points", None)
        found = points() if callable(points) else None
        if found is not None:
            return found
    return None


def write_run_plots(
    module: SupervisedModule,
    dm: Any,
    run_dir: Path,
    *,
    task: str,
    outputs: dict[str, torch.Tensor] | None = None,
    name: str | None = None,
    max_points: int = 1500,
) -> None:
    """t-SNE of test features (anchors or prototypes embedded with them and marked, a class
    legend, a note when SAR's gate never opened), anchor similarity, training curves.

    ``outputs``: test ``features`` and ``labels`` collected before (otherwise collected
    here with :func:`collect_outputs`). ``name``: the run's name for the titles (default:
    the ``name`` in ``run_dir/config.yaml``, else the folder's name); ``max_points``: at most
    this many test points in the t-SNE (the config's ``eval.tsne_points``). With fewer
    points (and anchors) than a t-SNE needs (:data:`~anchorlearn.viz.plots.TSNE_MIN_POINTS`,
    e.g. after a small ``data.max_test_samples``) the t-SNE is skipped with a one-line note
    on stderr: the run's metrics are written before, and its pictures never fail it."""
    from anchorlearn.viz import plots as viz

    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    if outputs is None:
        outputs = collect_outputs(module, dm, max_points=max(2000, max_points))
    ref = reference_points(module)
    name = _run_name(run_dir) if name is None else name
    # a finished run is never failed by its pictures: too few test points (a small
    # data.max_test_samples) skip the t-SNE, with a note
    points = min(len(outputs["labels"]), max_points)
    stars = 0 if ref is None else len(ref[1])
    if points + stars < viz.TSNE_MIN_POINTS:
        with_stars = f" and {stars} {ref[0]}" if stars else ""
        print(
            f"anchorlearn: note: no t-SNE picture: {points} test points{with_stars}, it "
            f"needs at least {viz.TSNE_MIN_POINTS} (metrics.json is written)",
            file=sys.stderr,
        )
    else:
        viz.plot_tsne(
            outputs["features"],
            outputs["labels"],
            plots / "tsne.png",
            anchors=None if ref is None else ref[1],
            max_points=max_points,
            title=f"{name}: test features{'' if ref is None else ' and ' + ref[0]} (t-SNE)",
            class_names=list(dm.class_names),
            note=shut_gate_note(module),
        )
    if ref is not None:
        viz.plot_anchor_similarity(
            ref[1],
            plots / "anchor_similarity.png",
            class_names=list(dm.class_names),
            title=f"{name}: cosine similarity of the {ref[0]}",
        )
    history = _training_history(run_dir / "logs")
    if history:
        wanted = _curve_columns(history)
        if wanted:
            # iteration-based runs (one long epoch) are drawn against the optimiser step
            by_step = "val/miou" in wanted
            viz.plot_training_curves(
                history,
                plots / "training_curves.png",
                metrics=wanted,
                x="step" if by_step else "epoch",
            )


def _run_name(run_dir: Path) -> str:
    """The ``name`` in ``run_dir/config.yaml``, else the folder's name."""
    try:
        stored = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        stored = None
    name = stored.get("name") if isinstance(stored, dict) else None
    return str(name) if name else run_dir.name


def _training_history(logs: Path) -> list[dict[str, float]]:
    """Rows of every attempt's ``metrics.csv`` (a resumed run logs into a new version)."""
    rows: list[dict[str, float]] = []
    for path in sorted(logs.glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:])):
        with path.open() as fh:
            for row in csv.DictReader(fh):
                rows.append({k: float(v) for k, v in row.items() if v not in ("", None)})
    return rows


def _curve_columns(history: list[dict[str, float]]) -> list[str]:
    header = set().union(*history)
    if "val/miou" in header:  # an iteration-based segmentation run
        keep: tuple[str, ...] = ("train/loss_step", "val/miou", "val/aacc")
    else:
        keep = ("train/loss_epoch", "train/acc_epoch", "val/acc", "val/pixel_acc")
    found = [c for c in keep if c in header]
    if not found:
        found = sorted(c for c in header if c.startswith(("train/loss", "val/")))[:3]
    return found


def _num(value: Any) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value
