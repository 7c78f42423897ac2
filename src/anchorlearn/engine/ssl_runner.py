"""Self-supervised pretraining runs end to end: data, MoCo, E-step, Lightning fit, evaluation.

The evaluation (:func:`evaluate_pretrained`) works on frozen networks: a linear probe and a
weighted kNN on the backbone features, alignment and uniformity of the 128-d embedding,
a k-means of the test embedding scored by coagulation, NMI and AMI, and a t-SNE picture.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from anchorlearn.cluster import kmeans
from anchorlearn.metrics.ssl import alignment, clustering_scores, coagulation, knn_accuracy
from anchorlearn.metrics.ssl import uniformity as uniformity_metric
from anchorlearn.models.moco import MoCo

from .config import ConfigError
from .datamodules import TwoViewDataModule
from .rundir import (
    DATA_FINGERPRINT_FILE,
    DATA_FINGERPRINT_KEY,
    check_data_fingerprint,
    check_output_dir,
    check_output_file,
    is_secondary_rank,
    lock_run_dir,
    write_json,
)
from .runner import (
    CONFIG_KEY,
    RESUMABLE_CHANGES,
    RunError,
    StoreConfig,
    TrainClock,
    create_model_for_data,
    load_weights,
    make_trainer,
    read_checkpoint,
    refuse_changed_config,
    resume_differences,
    start_run,
)
from .ssl_config import PretrainConfig, parse_pretrain_config, pretrain_config_to_dict
from .ssl_module import ContrastivePretrainModule, EStepCallback

__all__ = [
    "PRETRAIN_CONFIG_KEY",
    "build_pretrain_run",
    "evaluate_pretrained",
    "linear_probe_accuracy",
    "load_pretrain_checkpoint",
    "pretrain",
    "probe_checkpoint",
]

PRETRAIN_CONFIG_KEY = "anchorlearn_pretrain_config"
_EMBED_BATCH = 1024


def build_pretrain_run(cfg: PretrainConfig) -> tuple[TwoViewDataModule, ContrastivePretrainModule]:
    """The data module and the Lightning module of a config, checked against each other.

    Raises :class:`RunError` before any training when a cluster count exceeds the number of
    training (E-step) or test (evaluation) samples.
    """
    if cfg.cluster.backend == "faiss" and importlib.util.find_spec("faiss") is None:
        raise RunError(
            "cluster.backend is faiss but faiss is not installed: pip install "
            "'anchorlearn[faiss]', or set cluster.backend to torch or auto"
        )
    d = cfg.data
    try:
        dm = TwoViewDataModule(
            source=d.source,
            batch_size=d.batch_size,
            num_workers=d.num_workers,
            seed=cfg.seed,
            max_train_samples=d.max_train_samples,
            max_test_samples=d.max_test_samples,
        )
        dm.setup("fit")
    except FileNotFoundError as err:
        raise RunError(str(err)) from err
    except ValueError as err:
        raise ConfigError(f"data: {err}") from err
    num_train = len(dm.labelled_dataset("train"))
    num_test = len(dm.labelled_dataset("test"))
    largest = max(cfg.cluster.num_clusters)
    if cfg.method != "moco" and largest > num_train:
        raise RunError(
            f"cluster.num_clusters asks for k={largest} clusters but the training set has "
            f"only {num_train} images: lower cluster.num_clusters or raise "
            "data.max_train_samples"
        )
    if cfg.cluster.num_clusters[0] > num_test:
        raise RunError(
            f"the evaluation clusters the test set into cluster.num_clusters[0]="
            f"{cfg.cluster.num_clusters[0]} groups but it has only {num_test} images: lower "
            "it or raise data.max_test_samples"
        )
    backbone = create_model_for_data(cfg.model.name, cfg.model.kwargs, dm, d.source)
    if not hasattr(backbone, "feat_dim"):
        raise ConfigError(f"model {cfg.model.name!r} has no feat_dim: it cannot be pretrained")
    # The classifier gets no gradient in pretraining; DDP requires every parameter to get one.
    if isinstance(getattr(backbone, "classifier", None), nn.Module):
        backbone.classifier = nn.Identity()
    m = cfg.model
    try:
        moco = MoCo(
            backbone,
            int(backbone.feat_dim),
            dim=m.dim,
            hidden_dim=m.hidden_dim,
            queue_size=m.queue_size,
            momentum=m.momentum,
            temperature=m.temperature,
            mlp=m.mlp,
        )
        module = ContrastivePretrainModule(
            moco,
            cfg.loss,
            cfg.optim,
            method=cfg.method,
            num_clusters=cfg.cluster.num_clusters,
            num_samples=num_train,
            seed=cfg.seed,
        )
    except ValueError as err:
        raise ConfigError(f"model/loss: {err}") from err
    # a dense (segmentation) network would only fail at the first training step
    sample = dm.preprocess(dm.labelled_dataset("train").tensors[0][:2])
    try:
        moco.embed(sample)
    except ValueError as err:
        raise ConfigError(
            f"model {cfg.model.name!r} cannot be pretrained: {err}; pretraining needs a "
            "backbone with pooled (N, feat_dim) features, e.g. small_cnn or resnet20"
        ) from err
    return dm, module


def load_pretrain_checkpoint(path: str | Path) -> dict:
    """Load a pretraining checkpoint safely (``weights_only=True``: loading never runs code)."""
    ckpt = read_checkpoint(path)
    if CONFIG_KEY in ckpt:
        raise RunError(f"{path} was written by `anchorlearn fit`: use `anchorlearn eval` on it")
    if PRETRAIN_CONFIG_KEY not in ckpt:
        raise RunError(f"{path} is not an anchorlearn pretraining checkpoint (no stored config)")
    return ckpt


def _check_compatible(ckpt: dict, cfg: PretrainConfig, path: Path) -> None:
    try:
        stored = pretrain_config_to_dict(parse_pretrain_config(ckpt[PRETRAIN_CONFIG_KEY]))
    except ConfigError as err:
        raise RunError(f"{path} holds a config this version cannot read: {err}") from err
    current = pretrain_config_to_dict(cfg)
    # the evaluation settings act after training: they may change
    refuse_changed_config(resume_differences(stored, current, RESUMABLE_CHANGES | {"eval.*"}), path)


def pretrain(
    cfg: PretrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    quiet: bool = False,
    plots: bool = True,
    allow_data_change: bool = False,
) -> dict[str, Any] | None:
    """Pretrain ``cfg`` into ``run_dir``, then evaluate it (global rank 0).

    Writes ``config.yaml``, ``data_fingerprint.json``, CSV logs
    (``logs/version_*/metrics.csv``, one folder per attempt), ``checkpoints/last.ckpt``
    (with the config stored under ``"anchorlearn_pretrain_config"`` and the data
    fingerprint under ``"anchorlearn_data_fingerprint"``), ``metrics.json`` and
    ``plots/tsne.png``. With ``resume`` an interrupted run continues from its
    ``last.ckpt`` (refused when the data changed since, unless ``allow_data_change``);
    without it, a run directory that already holds a checkpoint is an error. The run
    directory is locked while the run writes it (another process is refused). Returns the
    metrics on rank 0, ``None`` elsewhere.
    """
    run_dir = Path(run_dir)
    with lock_run_dir(run_dir):
        return _pretrain_locked(cfg, run_dir, resume, quiet, plots, allow_data_change)


def _pretrain_locked(
    cfg: PretrainConfig,
    run_dir: Path,
    resume: bool,
    quiet: bool,
    plots: bool,
    allow_data_change: bool,
) -> dict[str, Any] | None:
    t = cfg.trainer
    stored: dict[str, Any] = {}

    def check(last: Path) -> None:
        ckpt = load_pretrain_checkpoint(last)
        _check_compatible(ckpt, cfg, last)
        stored["fingerprint"] = ckpt.get(DATA_FINGERPRINT_KEY)

    ckpt_path = start_run(run_dir, t, cfg.seed, resume, check)
    dm, module = build_pretrain_run(cfg)
    fingerprint = dm.data_fingerprint()
    if ckpt_path is not None:
        check_data_fingerprint(
            stored["fingerprint"],
            fingerprint,
            checkpoint=ckpt_path,
            action="resume",
            allow=allow_data_change,
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    if not is_secondary_rank():  # rank 0 wrote them before it started this process
        config_text = yaml.safe_dump(pretrain_config_to_dict(cfg), sort_keys=False)
        (run_dir / "config.yaml").write_text(config_text)
        write_json(run_dir / DATA_FINGERPRINT_FILE, fingerprint)

    estep = EStepCallback(
        cfg.cluster.warmup_epochs,
        niter=cfg.cluster.niter,
        nredo=cfg.cluster.nredo,
        backend=cfg.cluster.backend,
        init=cfg.cluster.init,
        warm_start=cfg.cluster.warm_start,
        seed=cfg.seed,
        verbose=not quiet,
    )
    config_callback = StoreConfig(PRETRAIN_CONFIG_KEY, pretrain_config_to_dict(cfg))
    data_callback = StoreConfig(DATA_FINGERPRINT_KEY, fingerprint)
    clock = TrainClock()  # first, so that its epochs include the E-step
    trainer = make_trainer(
        t, run_dir, [clock, estep, config_callback, data_callback], quiet=quiet, limit_val_batches=0
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
    if not trainer.is_global_zero:
        return None
    train_seconds = clock.seconds
    module.to(trainer.strategy.root_device)  # Lightning's teardown moved it to the CPU
    metrics = evaluate_pretrained(module, dm, cfg, plot_dir=run_dir / "plots" if plots else None)
    estep_total = sum(row["estep_s"] for row in estep.timings)
    epoch_total = sum(row["train_epoch_s"] for row in estep.timings)
    with_estep = [row for row in estep.timings if row["estep_s"] > 0]
    metrics.update(
        {
            "train_seconds": round(train_seconds, 1),
            "epochs": int(trainer.current_epoch),
            "estep_seconds_mean": _mean_seconds(with_estep, "estep_s"),
            "estep_embed_seconds_mean": _mean_seconds(with_estep, "estep_embed_s"),
            "estep_cluster_seconds_mean": _mean_seconds(with_estep, "estep_cluster_s"),
            "train_epoch_seconds_mean": _mean_seconds(estep.timings, "train_epoch_s"),
            "estep_share": (
                round(estep_total / (estep_total + epoch_total), 4) if estep.timings else 0.0
            ),
        }
    )
    if t.devices > 1:
        metrics["ddp_world_size"] = int(trainer.world_size)
        metrics["ddp_max_state_diff"] = module.rank_state_divergence
    write_json(run_dir / "metrics.json", metrics)
    return metrics


def _mean_seconds(rows: list[dict[str, float]], key: str) -> float:
    """Mean of ``key`` over the timing rows, 0 when there are none (a row from a checkpoint
    written before the key existed counts as 0)."""
    return round(sum(row.get(key, 0.0) for row in rows) / len(rows), 2) if rows else 0.0


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    *,
    steps: int = 100,
    weight_decay: float = 1e-4,
) -> float:
    """Top-1 test accuracy of a multinomial logistic regression on frozen features.

    The features ``(N, D)`` / ``(M, D)`` are standardised with the training mean and std;
    the weights start at zero and are fitted full-batch with LBFGS (strong Wolfe line
    search, at most ``steps`` iterations) on cross-entropy plus ``weight_decay * ||W||^2``.
    Deterministic for given inputs.
    """
    mean = train_features.mean(dim=0)
    std = train_features.std(dim=0).clamp_min(1e-6)
    x_train = ((train_features - mean) / std).double()
    x_test = ((test_features - mean) / std).double()
    linear = nn.Linear(x_train.shape[1], num_classes).double()
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(
        linear.parameters(), lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe"
    )
    targets = train_labels.long()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(x_train), targets) + weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        predictions = linear(x_test).argmax(dim=1)
    return float((predictions == test_labels.long()).double().mean())


@torch.no_grad()
def _frozen_outputs(
    module: ContrastivePretrainModule, dm: TwoViewDataModule, split: str, views: bool
) -> dict[str, torch.Tensor]:
    """Backbone features, normalised embeddings (and of two augmented views) of a split."""
    encoder = module.moco.encoder_q
    dataset = dm.labelled_dataset(split)
    images, labels = dataset.tensors
    out: dict[str, list[torch.Tensor]] = {"features": [], "embedding": [], "view1": [], "view2": []}
    for start in range(0, images.shape[0], _EMBED_BATCH):
        batch = images[start : start + _EMBED_BATCH].to(module.device)
        x = dm.preprocess(batch)
        out["features"].append(encoder.features(x).float().cpu())
        out["embedding"].append(module.moco.embed(x, momentum=False).float().cpu())
        if views:
            first, second = dm.views(batch)
            out["view1"].append(module.moco.embed(first, momentum=False).float().cpu())
            out["view2"].append(module.moco.embed(second, momentum=False).float().cpu())
    result = {key: torch.cat(value) for key, value in out.items() if value}
    result["labels"] = labels.long()
    return result


def evaluate_pretrained(
    module: ContrastivePretrainModule,
    dm: TwoViewDataModule,
    cfg: PretrainConfig,
    *,
    plot_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Frozen-network evaluation of a pretrained module; torch is seeded with ``cfg.seed``.

    Metrics (test split unless said otherwise):

    - ``linear_probe``: :func:`linear_probe_accuracy` on backbone features (train -> test);
    - ``knn``: weighted kNN (``eval.knn_k``, ``eval.knn_temperature``, cosine) on backbone
      features of the labelled training split;
    - ``alignment``: of the normalised embeddings of two augmented views;
    - ``uniformity``: of one augmented view's embeddings (at most ``eval.uniformity_points``,
      drawn with the seed);
    - ``coagulation``, ``nmi``, ``ami``: of a k-means (``k = cluster.num_clusters[0]``) of
      the embeddings of the un-augmented test images.

    With ``plot_dir``, writes ``tsne.png``: one t-SNE of the un-augmented test embedding,
    coloured by label, and of the first granularity's E-step prototypes, drawn as stars, with
    the momentum encoder's embedding they were computed from (for ``moco``, or before any
    E-step: the test k-means centroids, with the query encoder's embedding they cluster).
    """
    torch.manual_seed(cfg.seed)
    was_training = module.training
    module.eval()
    try:
        train = _frozen_outputs(module, dm, "train", views=False)
        test = _frozen_outputs(module, dm, "test", views=True)
    finally:
        module.train(was_training)
    ev = cfg.eval
    num_classes = dm.num_classes
    metrics: dict[str, Any] = {"method": cfg.method, "name": cfg.name, "seed": cfg.seed}
    metrics["linear_probe"] = linear_probe_accuracy(
        train["features"],
        train["labels"],
        test["features"],
        test["labels"],
        num_classes,
        steps=ev.probe_steps,
        weight_decay=ev.probe_weight_decay,
    )
    metrics["knn"] = knn_accuracy(
        train["features"],
        train["labels"],
        test["features"],
        test["labels"],
        num_classes,
        k=ev.knn_k,
        temperature=ev.knn_temperature,
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
    metrics["num_train"] = int(train["labels"].shape[0])
    metrics["num_test"] = int(test["labels"].shape[0])
    if plot_dir is not None and ev.tsne:
        from anchorlearn.viz.plots import plot_tsne

        have_prototypes = module.uses_prototypes and int(module.estep_epoch) >= 0
        points, stars = test["embedding"], clusters.centroids
        kind, encoder = "test k-means centroids", "query"
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
            stars, kind, encoder = module.prototypes[0].cpu(), "E-step prototypes", "momentum"
        plot_tsne(
            points,
            test["labels"],
            Path(plot_dir) / "tsne.png",
            anchors=stars,
            max_points=ev.tsne_points,
            seed=cfg.seed,
            title=f"{cfg.name}: test embedding ({encoder} encoder), stars = {kind} (k={k})",
            anchors_are_classes=False,
            class_names=list(dm.class_names),
        )
    return metrics


def probe_checkpoint(
    path: str | Path,
    *,
    out: str | Path | None = None,
    plot_dir: str | Path | None = None,
    allow_data_change: bool = False,
) -> dict[str, Any]:
    """Rebuild a pretraining run from its checkpoint and re-run :func:`evaluate_pretrained`;
    with ``out``, write the metrics there as JSON (undefined ones as ``null``); with
    ``plot_dir``, draw the t-SNE there. Both are checked to be writable first. Data that
    changed since the run trained are refused unless ``allow_data_change``."""
    path = Path(path)
    if out is not None:
        check_output_file(out, "--out")
    if plot_dir is not None:
        check_output_dir(plot_dir, "--plots")
    ckpt = load_pretrain_checkpoint(path)
    cfg = parse_pretrain_config(ckpt[PRETRAIN_CONFIG_KEY])
    dm, module = build_pretrain_run(cfg)
    check_data_fingerprint(
        ckpt.get(DATA_FINGERPRINT_KEY),
        dm.data_fingerprint(),
        checkpoint=path,
        action="probe",
        allow=allow_data_change,
    )
    load_weights(module, ckpt["state_dict"], path)
    if plot_dir is not None:
        cfg.eval.tsne = True  # asked for, whatever the run itself drew
    metrics = evaluate_pretrained(module, dm, cfg, plot_dir=plot_dir)
    if out is not None:
        write_json(out, metrics)
    return metrics
