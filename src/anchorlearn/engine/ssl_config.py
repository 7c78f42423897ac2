"""Validated configs of self-supervised pretraining runs (MoCo, PCL, PAUC).

The same rules as :mod:`anchorlearn.engine.config`: YAML in, typed dataclasses out; an
unknown or mistyped key is a :class:`~anchorlearn.engine.schema.ConfigError` naming the key
and the allowed ones; ``--set a.b=value`` overrides are applied before validation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anchorlearn.losses.pauc import (
    ALIGNMENT_MODES,
    CORRELATION_MODES,
    UNIFORMITY_MODES,
    PAUCParameters,
)

from .config import PRECISIONS, OptimConfig, TrainerConfig, check_milestones
from .schema import (
    COMMON_RANGES,
    UNIT_INTERVAL,
    ConfigError,
    above,
    apply_overrides,
    at_least,
    build_config,
    check_choices,
    check_ranges,
    config_to_dict,
    read_config_file,
)

__all__ = [
    "ClusterConfig",
    "EvalConfig",
    "PretrainConfig",
    "PretrainDataConfig",
    "PretrainLossConfig",
    "PretrainModelConfig",
    "load_pretrain_config",
    "parse_pretrain_config",
    "pretrain_config_to_dict",
    "warmup_epochs",
]

METHODS = ("moco", "pcl", "pauc")
PAUC_TERMS = ("align_weight", "uniform_weight", "corr_weight")


@dataclass
class PretrainDataConfig:
    """Unlabelled training images (two views each) plus labelled train / test probe sets."""

    source: str = "fashion_mnist"
    batch_size: int = 256
    num_workers: int = 0
    max_train_samples: int | None = None
    max_test_samples: int | None = None
    # > 0: hold out this stratified fraction of the training images and evaluate on it
    # instead of the test images (for choosing settings; the test set is not read)
    val_fraction: float = 0.0
    # smallest area fraction of the views' random resized crop (MoCo v2: 0.2)
    crop_min_scale: float = 0.2


@dataclass
class PretrainModelConfig:
    """A backbone from the factory inside MoCo (momentum encoder, queue, MLP head)."""

    name: str = "small_cnn"
    kwargs: dict[str, Any] = field(default_factory=dict)
    dim: int = 128
    hidden_dim: int | None = None
    mlp: bool = True
    queue_size: int = 4096
    momentum: float = 0.999
    temperature: float = 0.2
    # 0: the backbone's BatchNorm as is; G >= 2: SplitBatchNorm with G chunks per (per-rank)
    # batch plus shuffled keys, against batch-statistics leakage (data.batch_size % G == 0)
    split_bn: int = 0


@dataclass
class ClusterConfig:
    """The E-step: k-means of the momentum embeddings at every granularity.

    ``num_clusters`` also sets ``k`` of the test-set clustering in the evaluation (its
    first entry), for every method including ``moco``.
    """

    num_clusters: list[int] = field(default_factory=lambda: [20, 50])
    # Epochs of InfoNCE only before the first E-step: warmup_epochs, or else
    # warmup_fraction * trainer.max_epochs rounded, halves up (at least 1 when the fraction
    # is > 0); set one of the two. Neither: warmup_fraction 0.2 (it was 2 epochs before
    # 2026-12: a config without either key now warms up for a fifth of its epochs).
    warmup_epochs: int | None = None
    warmup_fraction: float | None = None
    niter: int = 20
    nredo: int = 1
    backend: str = "auto"
    init: str = "auto"  # k-means seeding: auto (k-means++ up to k = 1000), k-means++, random
    # torch backend: Lloyd first on warm_start * k sampled rows when N > 2 * warm_start * k
    # (None: the library default, 256; 0: off); must stay unset with backend faiss
    warm_start: int | None = None


DEFAULT_WARMUP_FRACTION = 0.2


def warmup_epochs(cluster: ClusterConfig, max_epochs: int) -> int:
    """The epochs of InfoNCE only before the first E-step: ``cluster.warmup_epochs`` when
    set, else ``warmup_fraction * max_epochs`` rounded to the nearest epoch, halves up (at
    least 1 for a fraction above 0; :data:`DEFAULT_WARMUP_FRACTION` when neither is set).
    A run resumed with more epochs keeps its E-steps going once they have started."""
    if cluster.warmup_epochs is not None:
        return int(cluster.warmup_epochs)
    fraction = (
        DEFAULT_WARMUP_FRACTION if cluster.warmup_fraction is None else cluster.warmup_fraction
    )
    if fraction <= 0:
        return 0
    return max(1, math.floor(fraction * max_epochs + 0.5))  # halves round up


@dataclass
class PretrainLossConfig(PAUCParameters):
    """Weights of the objective ``w_i InfoNCE + w_p ProtoNCE + w_a align + w_u unif + w_c corr``.

    The PAUC terms and their options are the fields of
    :class:`~anchorlearn.losses.pauc.PAUCParameters` (those of
    :class:`~anchorlearn.losses.pauc.PAUCLoss`, with its defaults), except that a weight
    left at ``None`` takes the method's default: ``moco`` uses InfoNCE only; ``pcl`` adds
    ProtoNCE (weight 1); ``pauc`` adds ProtoNCE and the three PAUC terms (weight 1 each, any
    of them may be set to 0).
    """

    protonce_weight: float | None = None
    align_weight: float | None = None
    uniform_weight: float | None = None
    corr_weight: float | None = None
    infonce_weight: float = 1.0


@dataclass
class EvalConfig:
    """Evaluation after pretraining, on frozen features.

    ``probe_steps`` LBFGS iterations of a full-batch logistic regression on standardised
    backbone features (L2 penalty ``probe_weight_decay``); weighted kNN with ``knn_k`` and
    ``knn_temperature``, on features standardised like the probe's when
    ``knn_standardize``; uniformity on at most ``uniformity_points`` test embeddings; a
    t-SNE picture of at most ``tsne_points`` test embeddings when ``tsne``; low-shot linear
    probes with ``low_shot`` labels per class, ``low_shot_draws`` draws each.
    """

    probe_steps: int = 100
    probe_weight_decay: float = 1e-4
    knn_k: int = 200
    knn_temperature: float = 0.1
    # standardise every feature dimension with the training features' mean and std before
    # the cosine kNN, as the probes do (raw pixels, the floor, are standardised already)
    knn_standardize: bool = False
    uniformity_points: int = 2000
    tsne: bool = True
    tsne_points: int = 2000
    # labels per class of low-shot linear probes (each low_shot_draws random draws; the
    # metrics low_shot_<n> and low_shot_<n>_std); empty: none
    low_shot: list[int] = field(default_factory=list)
    low_shot_draws: int = 5


@dataclass
class PretrainConfig:
    """A whole pretraining run; ``method`` is ``moco``, ``pcl`` or ``pauc``."""

    name: str = "ssl"
    method: str = "pcl"
    seed: int = 0
    out_dir: str = "runs/ssl"
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    model: PretrainModelConfig = field(default_factory=PretrainModelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    loss: PretrainLossConfig = field(default_factory=PretrainLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


_CHOICES = {
    "method": METHODS,
    "cluster.backend": ("auto", "faiss", "torch"),
    "cluster.init": ("auto", "k-means++", "random"),
    "loss.uniform_mode": UNIFORMITY_MODES,
    "loss.align_mode": ALIGNMENT_MODES,
    "loss.corr_mode": CORRELATION_MODES,
    "loss.corr_features": UNIFORMITY_MODES,
    "optim.name": ("sgd", "adamw"),
    "optim.schedule": ("cosine", "constant"),
    "trainer.accelerator": ("cpu", "gpu", "cuda", "mps", "auto"),
    "trainer.precision": PRECISIONS,
}

_POSITIVE_INTS = (
    "data.batch_size",
    "model.dim",
    "model.queue_size",
    "cluster.niter",
    "cluster.nredo",
    "loss.num_negatives",
    "eval.probe_steps",
    "eval.knn_k",
    "eval.low_shot_draws",
    "trainer.max_epochs",
)


_RANGES = {
    **COMMON_RANGES,
    "data.max_train_samples": at_least(1),
    "data.max_test_samples": at_least(1),
    "cluster.warm_start": at_least(0),
    "model.momentum": UNIT_INTERVAL,
    "model.temperature": above(0),
    "eval.probe_weight_decay": at_least(0),
    "eval.knn_temperature": above(0),
    "eval.uniformity_points": at_least(2),
    "eval.tsne_points": at_least(2),
}


def load_pretrain_config(path: str | Path, overrides: list[str] | None = None) -> PretrainConfig:
    """Read a YAML file, apply ``key=value`` overrides, validate."""
    return parse_pretrain_config(apply_overrides(read_config_file(path), overrides or []))


def parse_pretrain_config(raw: dict[str, Any]) -> PretrainConfig:
    """Validate a raw mapping and fill in the method's default loss weights."""
    if ("task" in raw or "losses" in raw) and "method" not in raw:
        kind = f"task: {raw['task']}" if "task" in raw else "losses"
        raise ConfigError(
            f"this is a supervised training config ({kind}); run it with anchorlearn fit "
            "(anchorlearn pretrain trains configs with a method: moco, pcl or pauc)"
        )
    cfg = build_config(PretrainConfig, raw)
    check_choices(cfg, _CHOICES)
    check_milestones(cfg.trainer, cfg.optim)
    check_ranges(cfg, {key: at_least(1) for key in _POSITIVE_INTS})
    ks = cfg.cluster.num_clusters
    if not ks or any(k < 2 for k in ks):
        raise ConfigError(f"cluster.num_clusters must list cluster counts >= 2, got {ks}")
    if cfg.cluster.backend == "faiss" and cfg.cluster.warm_start is not None:
        raise ConfigError(
            f"cluster.warm_start={cfg.cluster.warm_start} applies to the torch backend only: "
            "remove it or set cluster.backend to auto or torch"
        )
    _check_warmup(cfg)
    _check_eval_split(cfg)
    check_ranges(cfg, _RANGES)
    shots = cfg.eval.low_shot
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in shots) or len(
        set(shots)
    ) != len(shots):
        raise ConfigError(
            f"eval.low_shot must list distinct labels per class as ints >= 1, got {shots}"
        )
    _check_split_bn(cfg)
    _refuse_supervised_only_settings(cfg)
    _resolve_loss_weights(cfg)
    return cfg


def _check_warmup(cfg: PretrainConfig) -> None:
    c = cfg.cluster
    if c.warmup_epochs is not None and c.warmup_fraction is not None:
        raise ConfigError(
            f"cluster.warmup_epochs={c.warmup_epochs} and cluster.warmup_fraction="
            f"{c.warmup_fraction} both set the warm-up: keep one of them"
        )
    if c.warmup_epochs is not None and c.warmup_epochs < 0:
        raise ConfigError(f"cluster.warmup_epochs must be >= 0, got {c.warmup_epochs}")
    if c.warmup_fraction is not None and not 0.0 <= c.warmup_fraction < 1.0:
        raise ConfigError(f"cluster.warmup_fraction must lie in [0, 1), got {c.warmup_fraction}")
    epochs = warmup_epochs(c, cfg.trainer.max_epochs)
    if cfg.method != "moco" and epochs >= cfg.trainer.max_epochs:
        how = (
            f"cluster.warmup_epochs={c.warmup_epochs}"
            if c.warmup_epochs is not None
            else f"a warm-up of {epochs} epochs (cluster.warmup_fraction)"
        )
        raise ConfigError(
            f"{how} leaves no epoch with an E-step in trainer.max_epochs="
            f"{cfg.trainer.max_epochs}: lower the warm-up or train longer"
        )


def _check_eval_split(cfg: PretrainConfig) -> None:
    d = cfg.data
    if not 0.0 <= d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must lie in [0, 1), got {d.val_fraction}")
    if d.val_fraction and d.max_test_samples is not None:
        raise ConfigError(
            f"data.max_test_samples={d.max_test_samples} caps the test split, which is not "
            f"scored with data.val_fraction={d.val_fraction} (the held-out training images "
            "are): remove one of them"
        )
    if not 0.0 < d.crop_min_scale <= 1.0:
        raise ConfigError(f"data.crop_min_scale must lie in (0, 1], got {d.crop_min_scale}")


def _check_split_bn(cfg: PretrainConfig) -> None:
    split, batch = cfg.model.split_bn, cfg.data.batch_size
    if split < 0 or split == 1:
        raise ConfigError(f"model.split_bn must be 0 (off) or an int >= 2, got {split}")
    if split and batch % split:
        raise ConfigError(
            f"model.split_bn={split} must divide data.batch_size={batch} (the per-rank batch "
            "is normalised in split_bn equal chunks): change one of them"
        )


# settings of supervised (segmentation) training that pretraining does not implement, with
# the value that means "not used"
_SUPERVISED_ONLY = {
    "trainer.max_steps": None,
    "trainer.val_every_n_steps": None,
    "trainer.checkpoint_every_n_steps": None,
    "trainer.accumulate_grad_batches": 1,
    "trainer.num_nodes": 1,
    "trainer.sync_batchnorm": False,
    "trainer.channels_last": False,
    "optim.warmup_steps": 0,
    "optim.backbone_lr_mult": 1.0,
}


def _refuse_supervised_only_settings(cfg: PretrainConfig) -> None:
    for key, unused in _SUPERVISED_ONLY.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value != unused:
            raise ConfigError(
                f"{key}={value!r} is a setting of `anchorlearn fit`; pretraining is "
                "epoch-based and does not use it: remove the key"
            )


def _resolve_loss_weights(cfg: PretrainConfig) -> None:
    loss = cfg.loss
    if cfg.method == "moco" and loss.protonce_weight not in (None, 0.0):
        raise ConfigError(
            f"loss.protonce_weight={loss.protonce_weight} needs prototypes: use method pcl or "
            "pauc, or remove the key"
        )
    if cfg.method != "pauc":
        for key in PAUC_TERMS:
            if getattr(loss, key) not in (None, 0.0):
                raise ConfigError(
                    f"loss.{key}={getattr(loss, key)} is a PAUC term: use method pauc (set the "
                    "other terms to 0 for one term alone), or remove the key"
                )
    default_proto = 0.0 if cfg.method == "moco" else 1.0
    default_pauc = 1.0 if cfg.method == "pauc" else 0.0
    if loss.protonce_weight is None:
        loss.protonce_weight = default_proto
    for key in PAUC_TERMS:
        if getattr(loss, key) is None:
            setattr(loss, key, default_pauc)
    for key in ("infonce_weight", "protonce_weight", *PAUC_TERMS):
        if getattr(loss, key) < 0:
            raise ConfigError(f"loss.{key} must be >= 0, got {getattr(loss, key)}")


def pretrain_config_to_dict(cfg: PretrainConfig) -> dict[str, Any]:
    """The config as plain Python types (YAML- and checkpoint-safe)."""
    return config_to_dict(cfg)
