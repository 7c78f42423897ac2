"""The frozen-network evaluation of a pretrained module (:func:`evaluate_pretrained`): a
linear probe and a weighted kNN on the backbone features, alignment and uniformity of the
128-d embedding, a k-means of the test embedding scored by coagulation, NMI and AMI, and a
t-SNE picture; and the summary of a run's E-step times (:func:`estep_time_metrics`).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from anchorlearn.cluster import kmeans
from anchorlearn.metrics.ssl import (
    alignment,
    clustering_scores,
    coagulation,
    knn_accuracy,
    linear_probe_accuracy,
    low_shot_probe_accuracies,
)
from anchorlearn.metrics.ssl import uniformity as uniformity_metric

from .datamodules import TwoViewDataModule
from .ssl_config import PretrainConfig
from .ssl_module import ContrastivePretrainModule

__all__ = [
    "COLLAPSED_PROTOTYPE_COSINE",
    "estep_time_metrics",
    "evaluate_pretrained",
    "prototype_tsne_text",
]

_EMBED_BATCH = 1024

# E-step prototypes whose mean pairwise cosine similarity exceeds this are nearly one point
# (an encoder with little training embeds every image alike): the t-SNE says so
COLLAPSED_PROTOTYPE_COSINE = 0.99


def prototype_tsne_text(prototypes: torch.Tensor, estep_epoch: int) -> tuple[str, str | None]:
    """What the t-SNE says of E-step ``prototypes`` ``(k, dim)`` computed at the start of
    epoch ``estep_epoch`` (counted from 0, as in the logs): a caption naming that E-step,
    and a note when they are nearly collapsed (mean pairwise cosine similarity above
    :data:`COLLAPSED_PROTOTYPE_COSINE`; ``None`` otherwise, and for a single prototype)."""
    caption = f"prototypes of the E-step at the start of epoch {int(estep_epoch)}"
    rows = torch.nn.functional.normalize(prototypes.detach().double(), dim=1)
    k = rows.shape[0]
    if k < 2:
        return caption, None
    cosines = rows @ rows.T
    mean = float((cosines.sum() - cosines.diagonal().sum()) / (k * (k - 1)))
    if mean <= COLLAPSED_PROTOTYPE_COSINE:
        return caption, None
    note = (
        f"prototypes nearly identical (mean cosine {mean:.4f}): the encoder had little "
        "training at that E-step"
    )
    return caption, note


def estep_time_metrics(timings: list[dict[str, float]]) -> dict[str, float]:
    """The E-step's share of a run's time, from :attr:`EStepCallback.timings
    <anchorlearn.engine.ssl_module.EStepCallback.timings>` (one row per epoch): the mean
    seconds of an E-step (``estep_seconds_mean``) and of its two parts, embedding and
    clustering, over the epochs that had one; the mean seconds of an epoch without its
    E-step (``train_epoch_seconds_mean``); and ``estep_share``, the E-steps' part of the
    total."""
    estep_total = sum(row["estep_s"] for row in timings)
    epoch_total = sum(row["train_epoch_s"] for row in timings)
    with_estep = [row for row in timings if row["estep_s"] > 0]
    return {
        "estep_seconds_mean": _mean_seconds(with_estep, "estep_s"),
        "estep_embed_seconds_mean": _mean_seconds(with_estep, "estep_embed_s"),
        "estep_cluster_seconds_mean": _mean_seconds(with_estep, "estep_cluster_s"),
        "train_epoch_seconds_mean": _mean_seconds(timings, "train_epoch_s"),
        "estep_share": round(estep_total / (estep_total + epoch_total), 4) if timings else 0.0,
    }


def _mean_seconds(rows: list[dict[str, float]], key: str) -> float:
    """Mean of ``key`` over the timing rows, 0 when there are none (a row from a checkpoint
    written before the key existed counts as 0)."""
    return round(sum(row.get(key, 0.0) for row in rows) / len(rows), 2) if rows else 0.0


@torch.no_grad()
def _frozen_outputs(
    module: ContrastivePretrainModule,
    dm: TwoViewDataModule,
    split: str,
    views: bool,
    features: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Backbone features, normalised embeddings (and of two augmented views) of a split.

    ``features``, when given, replaces the encoder: its output is the features, and
    L2-normalised, the embedding.
    """
    if features is None:
        features_of = module.moco.encoder_q.features

        def embed(x: torch.Tensor) -> torch.Tensor:
            return module.moco.embed(x, momentum=False)
    else:
        features_of = features

        def embed(x: torch.Tensor) -> torch.Tensor:
            return F.normalize(features(x), dim=1)

    dataset = dm.labelled_dataset(split)
    images, labels = dataset.tensors
    out: dict[str, list[torch.Tensor]] = {"features": [], "embedding": [], "view1": [], "view2": []}
    for start in range(0, images.shape[0], _EMBED_BATCH):
        batch = images[start : start + _EMBED_BATCH].to(module.device)
        x = dm.preprocess(batch)
        out["features"].append(features_of(x).float().cpu())
        out["embedding"].append(embed(x).float().cpu())
        if views:
            first, second = dm.views(batch)
            out["view1"].append(embed(first).float().cpu())
            out["view2"].append(embed(second).float().cpu())
    result = {key: torch.cat(value) for key, value in out.items() if value}
    result["labels"] = labels.long()
    return result


def evaluate_pretrained(
    module: ContrastivePretrainModule,
    dm: TwoViewDataModule,
    cfg: PretrainConfig,
    *,
    plot_dir: str | Path | None = None,
    features: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Frozen-network evaluation of a pretrained module; torch is seeded with ``cfg.seed``.

    ``features``, when given, replaces the module's encoder (e.g. raw pixels as a floor): a
    function of preprocessed images ``(B, C, H, W)`` to features ``(B, D)``, which stand
    for the backbone features and, L2-normalised, for the embedding.

    Metrics (test split unless said otherwise):

    - ``linear_probe``: :func:`~anchorlearn.metrics.ssl.linear_probe_accuracy` on backbone
      features (train -> test);
    - ``knn``: weighted kNN (``eval.knn_k``, ``eval.knn_temperature``, cosine) on backbone
      features of the labelled training split (standardised first with
      ``eval.knn_standardize``);
    - ``alignment``: of the normalised embeddings of two augmented views;
    - ``uniformity``: of one augmented view's embeddings (at most ``eval.uniformity_points``,
      drawn with the seed);
    - ``coagulation``, ``nmi``, ``ami``: of a k-means (``k = cluster.num_clusters[0]``) of
      the embeddings of the un-augmented test images;
    - ``low_shot_<n>`` and ``low_shot_<n>_std`` for each ``n`` of ``eval.low_shot``: mean
      and standard deviation over ``eval.low_shot_draws`` draws of
      :func:`~anchorlearn.metrics.ssl.low_shot_probe_accuracies`;
    - ``eval_split``: ``"val"`` when ``data.val_fraction`` held out training images in
      place of the test images, else ``"test"``.

    With ``plot_dir``, writes ``tsne.png``: one t-SNE of the un-augmented test embedding,
    coloured by label, and of the first granularity's E-step prototypes, drawn as stars, with
    the momentum encoder's embedding they were computed from (for ``moco``, or before any
    E-step: the test k-means centroids, with the query encoder's embedding they cluster).
    The title names the epoch whose E-step gave the prototypes, and a note says when they
    are nearly identical (:func:`prototype_tsne_text`).
    """
    torch.manual_seed(cfg.seed)
    was_training = module.training
    module.eval()
    try:
        train = _frozen_outputs(module, dm, "train", views=False, features=features)
        test = _frozen_outputs(module, dm, "test", views=True, features=features)
    finally:
        module.train(was_training)
    ev = cfg.eval
    num_classes = dm.num_classes
    metrics: dict[str, Any] = {"method": cfg.method, "name": cfg.name, "seed": cfg.seed}
    # every probe fits on the training split's features and scores the test split's
    split_pair = (train["features"], train["labels"], test["features"], test["labels"])
    probe = {"steps": ev.probe_steps, "weight_decay": ev.probe_weight_decay}
    metrics["linear_probe"] = linear_probe_accuracy(*split_pair, num_classes, **probe)
    for shots in ev.low_shot:
        accuracies = low_shot_probe_accuracies(
            *split_pair, num_classes, shots, draws=ev.low_shot_draws, seed=cfg.seed, **probe
        )
        metrics[f"low_shot_{shots}"] = statistics.fmean(accuracies)
        metrics[f"low_shot_{shots}_std"] = (
            statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        )
    metrics["knn"] = knn_accuracy(
        *split_pair,
        num_classes,
        k=ev.knn_k,
        temperature=ev.knn_temperature,
        standardize=ev.knn_standardize,
    )
    metrics["alignment"] = alignment(test["view1"], test["view2"])
    generator = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(test["view1"].shape[0], generator=generator)
    metrics["uniformity"] = uniformity_metric(test["view1"][order[: ev.uniformity_points]])
    k = cfg.cluster.num_clusters[0]
    c = cfg.cluster
    clusters = kmeans(
        test["embedding"],
        k,
        niter=c.niter,
        nredo=c.nredo,
        seed=cfg.seed,
        backend=c.backend,
        init=None if c.init == "auto" else c.init,  # type: ignore[arg-type]
        warm_start=c.warm_start,
    )
    metrics["coagulation"] = coagulation(test["embedding"], clusters.assignments)
    metrics.update(clustering_scores(clusters.assignments, test["labels"]))
    metrics["eval_split"] = dm.eval_split
    metrics["num_train"] = int(train["labels"].shape[0])
    metrics["num_test"] = int(test["labels"].shape[0])
    if plot_dir is not None and ev.tsne:
        from anchorlearn.viz.plots import plot_tsne

        have_prototypes = (
            features is None and module.uses_prototypes and int(module.estep_epoch) >= 0
        )
        points, stars = test["embedding"], clusters.centroids
        kind, note = "test k-means centroids", None
        encoder = "query encoder" if features is None else "given features"
        if have_prototypes:
            # The E-step clusters the momentum encoder's embeddings: its prototypes are
            # drawn with that encoder's embedding of the test images, in one t-SNE (beside
            # the query encoder's, they formed one clump away from every point).
            images = dm.labelled_dataset("test").tensors[0]
            chunks = [
                module.moco.embed(dm.preprocess(images[i : i + _EMBED_BATCH].to(module.device)))
                for i in range(0, images.shape[0], _EMBED_BATCH)
            ]
            points = torch.cat(chunks).float().cpu()
            stars, encoder = module.prototypes[0].cpu(), "momentum encoder"
            # after a short run the last E-step's prototypes may sit as one star
            kind, note = prototype_tsne_text(stars, int(module.estep_epoch))
        plot_tsne(
            points,
            test["labels"],
            Path(plot_dir) / "tsne.png",
            anchors=stars,
            max_points=ev.tsne_points,
            seed=cfg.seed,
            title=f"{cfg.name}: test embedding ({encoder})\nstars = {kind} (k={k})",
            anchors_are_classes=False,
            class_names=list(dm.class_names),
            note=note,
        )
    return metrics
