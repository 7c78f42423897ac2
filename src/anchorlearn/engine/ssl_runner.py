"""Self-supervised pretraining runs end to end: data, MoCo, E-step, Lightning fit, and the
frozen-network evaluation of :mod:`~anchorlearn.engine.ssl_evaluate`.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from anchorlearn.models.moco import MoCo

from .datamodules import TwoViewDataModule
from .rundir import (
    DATA_FINGERPRINT_KEY,
    check_output_dir,
    check_output_file,
    lock_run_dir,
    write_json,
)
from .runs import (
    CONFIG_KEY,
    RESUMABLE_CHANGES,
    RunError,
    StoreConfig,
    TrainClock,
    create_model_for_data,
    make_trainer,
    open_run,
    read_checkpoint,
    refuse_changed_config,
    restore_run,
    resume_differences,
)
from .schema import ConfigError
from .ssl_config import (
    PretrainConfig,
    load_pretrain_config,
    parse_pretrain_config,
    pretrain_config_to_dict,
)
from .ssl_evaluate import estep_time_metrics, evaluate_pretrained
from .ssl_module import ContrastivePretrainModule, EStepCallback

__all__ = [
    "FLOOR_KINDS",
    "PRETRAIN_CONFIG_KEY",
    "build_pretrain_run",
    "load_pretrain_checkpoint",
    "pretrain",
    "probe_checkpoint",
    "probe_floor",
]

PRETRAIN_CONFIG_KEY = "anchorlearn_pretrain_config"

# the encoders that bound an SSL table from below: an untrained network and raw pixels
FLOOR_KINDS = ("random_init", "pixels")


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
            val_fraction=d.val_fraction,
            crop_min_scale=d.crop_min_scale,
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
        split, raise_it = (
            ("validation split", "data.val_fraction or data.max_train_samples")
            if dm.eval_split == "val"
            else ("test set", "data.max_test_samples")
        )
        raise RunError(
            f"the evaluation clusters the {split} into cluster.num_clusters[0]="
            f"{cfg.cluster.num_clusters[0]} groups but it has only {num_test} images: lower "
            f"it or raise {raise_it}"
        )
    if cfg.eval.low_shot:
        counts = torch.bincount(dm.labelled_dataset("train").tensors[1], minlength=dm.num_classes)
        fewest = int(counts.min())
        if max(cfg.eval.low_shot) > fewest:
            raise RunError(
                f"eval.low_shot asks for {max(cfg.eval.low_shot)} labels per class but class "
                f"{dm.class_names[int(counts.argmin())]!r} has {fewest} training images: lower "
                "eval.low_shot or raise data.max_train_samples"
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
            split_bn=m.split_bn,
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
    config = pretrain_config_to_dict(cfg)
    ckpt_path, dm, module, fingerprint = open_run(
        run_dir,
        t,
        cfg.seed,
        config,
        resume=resume,
        load=load_pretrain_checkpoint,
        check_resumable=lambda ckpt, path: _check_compatible(ckpt, cfg, path),
        build=lambda: build_pretrain_run(cfg),
        allow_data_change=allow_data_change,
    )
    estep = EStepCallback(cfg.cluster, seed=cfg.seed, verbose=not quiet)
    config_callback = StoreConfig(PRETRAIN_CONFIG_KEY, config)
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
    metrics["train_seconds"] = round(train_seconds, 1)
    metrics["epochs"] = int(trainer.current_epoch)
    metrics.update(estep_time_metrics(estep.timings))
    if t.devices > 1:
        metrics["ddp_world_size"] = int(trainer.world_size)
        metrics["ddp_max_state_diff"] = module.rank_state_divergence
    write_json(run_dir / "metrics.json", metrics)
    return metrics


def probe_checkpoint(
    path: str | Path,
    *,
    out: str | Path | None = None,
    plot_dir: str | Path | None = None,
    allow_data_change: bool = False,
) -> dict[str, Any]:
    """Rebuild a pretraining run from its checkpoint and re-run
    :func:`~.ssl_evaluate.evaluate_pretrained`;
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
    dm, module = restore_run(
        ckpt,
        path,
        lambda: build_pretrain_run(cfg),
        action="probe",
        allow_data_change=allow_data_change,
    )
    if plot_dir is not None:
        cfg.eval.tsne = True  # asked for, whatever the run itself drew
    metrics = {"encoder": "checkpoint", **evaluate_pretrained(module, dm, cfg, plot_dir=plot_dir)}
    if out is not None:
        write_json(out, metrics)
    return metrics


def probe_floor(
    config: PretrainConfig | str | Path,
    kind: str = "random_init",
    *,
    overrides: Sequence[str] = (),
    out: str | Path | None = None,
    plot_dir: str | Path | None = None,
) -> dict[str, Any]:
    """The metrics of :func:`probe_checkpoint` for an encoder that had no pretraining: the
    floor a pretrained one has to beat, on the same data, split and ``eval`` settings.

    ``config`` is a pretraining config, or the path of one (``overrides``, ``key=value``,
    apply to a path only). ``kind`` is ``"random_init"``, the config's network as
    initialised with ``cfg.seed``, or ``"pixels"``, the preprocessed images flattened to
    ``(N, C*H*W)`` and standardised per pixel with the training split's mean and std (a
    pixel constant over the training split is only centred); these are the features, and
    L2-normalised, the embedding. The metrics carry ``"encoder": kind``. ``out`` and
    ``plot_dir`` are as in :func:`probe_checkpoint`.
    """
    if kind not in FLOOR_KINDS:
        raise ValueError(f"kind must be one of {list(FLOOR_KINDS)}, got {kind!r}")
    if isinstance(config, PretrainConfig):
        if overrides:
            raise ValueError(
                f"overrides apply to a config path only, got {list(overrides)} with a "
                "PretrainConfig"
            )
        cfg = copy.deepcopy(config)  # --plots turns the t-SNE on in this copy only
    elif isinstance(config, (str, Path)):
        cfg = load_pretrain_config(config, list(overrides))
    else:
        raise TypeError(f"config must be a PretrainConfig or a path, got {type(config).__name__}")
    if out is not None:
        check_output_file(out, "--out")
    if plot_dir is not None:
        check_output_dir(plot_dir, "--plots")
        cfg.eval.tsne = True
    L.seed_everything(cfg.seed, verbose=False)  # the initialisation a run of this seed starts from
    dm, module = build_pretrain_run(cfg)
    features = None
    if kind == "pixels":
        train = dm.preprocess(dm.labelled_dataset("train").tensors[0]).flatten(1)
        mean, std = train.mean(dim=0), train.std(dim=0)
        std = torch.where(std > 0, std, torch.ones_like(std))

        def features(x: torch.Tensor) -> torch.Tensor:
            return (x.flatten(1) - mean.to(x.device)) / std.to(x.device)

    metrics = evaluate_pretrained(module, dm, cfg, plot_dir=plot_dir, features=features)
    metrics = {"encoder": kind, **metrics}
    if out is not None:
        write_json(out, metrics)
    return metrics
