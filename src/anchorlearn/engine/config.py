"""Validated experiment configs: YAML in, typed dataclasses out.

Every section is a dataclass. An unknown or mistyped key, or a value of the wrong type, is a
:class:`ConfigError` naming the key and the allowed ones; so is a key given twice in one
mapping (with both line numbers), and a loss parameter its loss does not take.
``--set a.b=value`` overrides are applied to the raw mapping before validation, so they are
checked the same way. The machinery is :mod:`~anchorlearn.engine.schema`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anchorlearn.data.segmentation_sets import SEGMENTATION_KINDS

from .schema import (
    COMMON_RANGES,
    OPEN_UNIT_INTERVAL,
    ConfigError,
    DuplicateKeyError,
    Range,
    apply_overrides,
    at_least,
    build_config,
    check_choices,
    check_ranges,
    config_to_dict,
    read_config_file,
    yaml_load,
)

__all__ = [
    "ConfigError",
    "DataConfig",
    "DuplicateKeyError",
    "EvalConfig",
    "ExperimentConfig",
    "InferenceConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "SemiConfig",
    "TrainerConfig",
    "apply_overrides",
    "config_to_dict",
    "load_config",
    "parse_config",
    "read_config_file",
    "yaml_load",
]


@dataclass
class DataConfig:
    """Where the data comes from and how it is split and batched."""

    source: str = "fashion_mnist"
    imbalance_ratio: float = 1.0
    profile: str = "exp"
    val_fraction: float = 0.1
    batch_size: int = 128
    num_workers: int = 0
    max_train_samples: int | None = None
    # classification: score on a class-stratified subset of exactly this many test images
    # (drawn with the run's seed), for fast runs; at least one per class of the test split
    max_test_samples: int | None = None
    augment: bool = True
    canvas: int = 64
    num_train_scenes: int = 2000
    num_val_scenes: int = 500
    scene_imbalance_ratio: float = 10.0
    # segmentation data sets in their standard layouts (ade20k:, cityscapes:, camvid:, ...)
    crop_size: list[int] | None = None
    base_size: list[int] | None = None
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    cat_max_ratio: float = 0.75
    photometric: bool = True
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    # semi-supervised training: classification, the fraction of every class of the training
    # images whose labels are used; segmentation (the kind:ROOT data sets), the fraction of
    # the training images whose masks are used. The rest train unlabelled (see SemiConfig);
    # None: all labelled
    labelled_fraction: float | None = None
    # unlabelled images per labelled image in a training step (FixMatch's mu); None: 7 for
    # classification, 1 for segmentation when labelled_fraction is set (a parsed config
    # holds the value)
    unlabelled_ratio: int | None = None


@dataclass
class ModelConfig:
    """A model from the factory; ``etf_classifier`` classifies with a fixed simplex ETF
    behind a batch normalisation of the features (:class:`~anchorlearn.models.FixedETFModel`)."""

    name: str = "small_cnn"
    kwargs: dict[str, Any] = field(default_factory=dict)
    etf_classifier: bool = False
    # the fixed classifier's class vectors: "etf", or "uniform" on the hypersphere (fixed
    # hyperspherical prototypes; with dot_regression, Mettes et al. 2019's loss)
    classifier_geometry: str = "etf"


@dataclass
class LossConfig:
    """One term of the training objective: ``name`` and the loss's own keyword arguments."""

    name: str = "ce"
    params: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def raw_mapping(value: Any, key: str) -> dict[str, Any]:
        """Losses are written flat (``{name: sar, pull_weight: 0.1}``), with their
        parameters under ``params``, both (merged), or as a bare name."""
        if isinstance(value, str):
            return {"name": value}
        if not isinstance(value, dict) or "name" not in value:
            raise ConfigError(
                f"{key} must be a loss name or a mapping with a 'name' key, got {value!r}"
            )
        nested = value.get("params") or {}
        if not isinstance(nested, dict):
            raise ConfigError(f"{key}.params must be a mapping, got {nested!r}")
        flat = {k: v for k, v in value.items() if k not in ("name", "params")}
        both = sorted(set(flat) & set(nested))
        if both:
            raise ConfigError(f"{key}: {both[0]!r} is given both flat and under params")
        return {"name": value["name"], "params": {**nested, **flat}}


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: int = 0
    warmup_steps: int = 0
    poly_power: float = 0.9
    min_lr: float = 0.0
    backbone_lr_mult: float = 1.0
    # schedule "step": the learning rate is multiplied by gamma at each milestone (epochs,
    # or optimiser steps with trainer.max_steps)
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1


@dataclass
class TrainerConfig:
    max_epochs: int = 10
    accelerator: str = "cpu"
    devices: int = 1
    precision: str = "32-true"
    log_every_n_steps: int = 20
    progress: bool = True
    deterministic: bool = False
    max_steps: int | None = None
    val_every_n_steps: int | None = None
    checkpoint_every_n_steps: int | None = None
    accumulate_grad_batches: int = 1
    num_nodes: int = 1
    sync_batchnorm: bool = False
    channels_last: bool = False


@dataclass
class InferenceConfig:
    """How segmentation images are scored (validation, test, ``eval``): see
    :func:`anchorlearn.inference.segment`. ``base_size`` ``[h, w]`` first rescales each
    image, aspect ratio kept, to fit it (long side <= the larger, short side <= the smaller
    number: mmsegmentation's test ``Resize``; ``None``: the image's own size); ``scales``
    then resize it further (multi-scale testing); ``crop_size`` and ``stride`` ``[h, w]``
    are the sliding windows. Logits are always scored at the labels' full size."""

    mode: str = "whole"
    base_size: list[int] | None = None
    crop_size: list[int] | None = None
    stride: list[int] | None = None
    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = False
    batch_size: int = 1


@dataclass
class EvalConfig:
    """What the evaluation after training draws: ``plots`` (training curves, t-SNE) and at
    most ``tsne_points`` (>= 3, what a t-SNE needs) test embeddings in the t-SNE picture."""

    plots: bool = True
    tsne_points: int = 1500


@dataclass
class SemiConfig:
    """Semi-supervised training with ``data.labelled_fraction`` (Sohn et al. 2020, FixMatch,
    NeurIPS): the consistency loss on the unlabelled images is ``unlabelled_weight`` times
    the mean over every unlabelled image (segmentation: every valid cell of the logits) of
    ``1[max p_weak >= threshold] * CE(strong logits, argmax p_weak)``;
    ``unlabelled_weight: 0`` draws no unlabelled batches at all (the labelled part alone, on
    the same schedule of steps). ``sar_unlabelled`` also pulls the strong-view features of
    the confident unlabelled images (pixels) towards the semantic anchors of their
    pseudo-labels (``None``: whenever the losses include ``sar`` and ``unlabelled_weight`` is
    above 0; a parsed config holds the value)."""

    threshold: float = 0.95
    unlabelled_weight: float = 1.0
    sar_unlabelled: bool | None = None


@dataclass
class ExperimentConfig:
    """A whole run. ``task`` is ``classification`` or ``segmentation``."""

    name: str = "run"
    task: str = "classification"
    seed: int = 0
    out_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    losses: list[LossConfig] = field(default_factory=lambda: [LossConfig()])
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # given only with data.labelled_fraction (which fills in the defaults when it is absent)
    semi: SemiConfig | None = None


# Full precision or mixed precision (Lightning's "16" and "bf16" mean the mixed ones). The
# "*-true" half and double precisions are left out: they would convert the losses' state
# (counts, EMA prototypes, anchors) along with the weights, and the data modules hand over
# float32 batches.
PRECISIONS = ("32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16")

_CHOICES = {
    "task": ("classification", "segmentation"),
    "model.classifier_geometry": ("etf", "uniform"),
    "data.profile": ("exp", "step"),
    "optim.name": ("sgd", "adamw"),
    "optim.schedule": ("cosine", "constant", "poly", "step"),
    "trainer.accelerator": ("cpu", "gpu", "cuda", "mps", "auto"),
    "trainer.precision": PRECISIONS,
    "inference.mode": ("whole", "slide"),
}


_RANGES: dict[str, Range] = {
    **COMMON_RANGES,
    "data.imbalance_ratio": at_least(1),
    "data.max_train_samples": at_least(1),
    # the evaluation compares classes: one test image is one class (the data module also
    # refuses fewer than the classes its test split holds)
    "data.max_test_samples": at_least(2),
    "data.val_fraction": OPEN_UNIT_INTERVAL,  # the validation split is never empty
    "data.canvas": at_least(8),
    "data.num_train_scenes": at_least(1),
    "data.num_val_scenes": at_least(1),
    "data.scene_imbalance_ratio": at_least(1),
    "data.cat_max_ratio": ((lambda v: 0 < v <= 1), "in (0, 1]"),
    "data.labelled_fraction": ((lambda v: 0 < v <= 1), "in (0, 1]"),
    "data.unlabelled_ratio": at_least(1),
    "inference.batch_size": at_least(1),
    # anchorlearn.viz.plots.TSNE_MIN_POINTS (not imported here: it pulls in matplotlib)
    "eval.tsne_points": at_least(3),
}


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML file, apply ``key=value`` overrides, validate."""
    return parse_config(apply_overrides(read_config_file(path), overrides or []))


def parse_config(raw: dict[str, Any]) -> ExperimentConfig:
    if "method" in raw and "losses" not in raw:
        raise ConfigError(
            f"this is a self-supervised pretraining config (method: {raw['method']}); run it "
            "with anchorlearn pretrain (anchorlearn fit trains configs with task and losses)"
        )
    cfg = build_config(ExperimentConfig, raw)
    check_choices(cfg, _CHOICES)
    if not cfg.losses:
        raise ConfigError("losses must list at least one loss")
    _check_losses(cfg.losses)
    check_ranges(cfg, _RANGES)
    check_step_settings(cfg.trainer, cfg.optim)
    check_milestones(cfg.trainer, cfg.optim)
    if cfg.model.classifier_geometry != "etf" and not cfg.model.etf_classifier:
        raise ConfigError(
            f"model.classifier_geometry={cfg.model.classifier_geometry!r} shapes the fixed "
            "classifier: it needs model.etf_classifier: true"
        )
    _check_segmentation_settings(cfg)
    _check_semi_supervised_settings(cfg)
    if cfg.task == "segmentation" and any(spec.name == "sar_plus" for spec in cfg.losses):
        raise ConfigError(
            "loss sar_plus is for classification: its effective-number weights (beta 0.9999) "
            "are equal for every class once a class has thousands of pixels, so on "
            "segmentation it would be the release's SAR; use sar, with class_weights: "
            "inverse for a class-balanced pull"
        )
    if cfg.task != "classification" and cfg.data.max_test_samples is not None:
        raise ConfigError(
            f"data.max_test_samples={cfg.data.max_test_samples} is for classification; "
            "segmentation runs score their whole test split: remove the key"
        )
    return cfg


def _check_losses(losses: list[LossConfig]) -> None:
    """Every loss is a known one and every parameter one its class takes, so that a typo
    stops a run as the config is read: before any data is loaded, and before ``compare``
    trains the configs listed ahead of it."""
    from .objective import check_losses  # the loss classes import torch

    check_losses(losses)


def check_step_settings(t: TrainerConfig, o: OptimConfig) -> None:
    """Iteration-based settings (``trainer.max_steps`` and what goes with it) are coherent."""
    if t.max_steps is None:
        for key in ("val_every_n_steps", "checkpoint_every_n_steps"):
            if getattr(t, key) is not None:
                raise ConfigError(
                    f"trainer.{key} needs trainer.max_steps (iteration-based training); "
                    "epoch-based runs validate and checkpoint every epoch"
                )
        if o.warmup_steps:
            raise ConfigError(
                "optim.warmup_steps needs trainer.max_steps; epoch-based runs use "
                "optim.warmup_epochs"
            )
        return
    if o.warmup_epochs:
        raise ConfigError(
            "optim.warmup_epochs is for epoch-based runs; with trainer.max_steps use "
            "optim.warmup_steps"
        )
    if o.warmup_steps >= t.max_steps:
        raise ConfigError(
            f"optim.warmup_steps ({o.warmup_steps}) must be below trainer.max_steps ({t.max_steps})"
        )
    if o.min_lr > o.lr:
        raise ConfigError(f"optim.min_lr ({o.min_lr}) must not exceed optim.lr ({o.lr})")


def check_milestones(t: TrainerConfig, o: OptimConfig) -> None:
    """``optim.milestones`` are increasing epochs (steps with ``trainer.max_steps``) inside
    the run, given exactly when the schedule is ``step``."""
    unit, length = ("step", t.max_steps) if t.max_steps is not None else ("epoch", t.max_epochs)
    if o.schedule != "step":
        if o.milestones:
            raise ConfigError(
                f"optim.milestones are for optim.schedule step, got schedule {o.schedule!r}: "
                "remove them or set optim.schedule: step"
            )
        return
    if not o.milestones:
        raise ConfigError(
            f"optim.schedule step needs optim.milestones (the {unit}s at which the learning "
            "rate is multiplied by optim.gamma), e.g. [160, 180]"
        )
    if any(isinstance(m, bool) or not isinstance(m, int) for m in o.milestones):
        raise ConfigError(f"optim.milestones must be integers, got {o.milestones!r}")
    if any(b <= a for a, b in zip(o.milestones, o.milestones[1:], strict=False)):
        raise ConfigError(f"optim.milestones must increase, got {o.milestones!r}")
    if o.milestones[0] < 1 or o.milestones[-1] >= length:
        raise ConfigError(
            f"optim.milestones must lie in 1..{length - 1} (the run has {length} {unit}s), "
            f"got {o.milestones!r}"
        )
    if not 0 < o.gamma <= 1:
        raise ConfigError(f"optim.gamma must be in (0, 1], got {o.gamma!r}")
    warmup = o.warmup_steps if t.max_steps is not None else o.warmup_epochs
    if o.milestones[0] < warmup:
        raise ConfigError(
            f"optim.milestones must not fall inside the warm-up ({warmup} {unit}s), got "
            f"{o.milestones!r}: a milestone inside it would be applied only once it ends"
        )


def _pair(value: list | None, key: str, kind: type) -> None:
    if value is None:
        return
    if len(value) != 2 or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{key} must be a list of two {kind.__name__}s [h, w], got {value!r}")
    if min(value) <= 0:
        raise ConfigError(f"{key} must be positive, got {value!r}")


def _check_segmentation_settings(cfg: ExperimentConfig) -> None:
    d, inf = cfg.data, cfg.inference
    _pair(d.crop_size, "data.crop_size", int)
    _pair(d.base_size, "data.base_size", int)
    _pair(inf.base_size, "inference.base_size", int)
    _pair(inf.crop_size, "inference.crop_size", int)
    _pair(inf.stride, "inference.stride", int)
    if len(d.ratio_range) != 2 or not 0 < d.ratio_range[0] <= d.ratio_range[1]:
        raise ConfigError(
            f"data.ratio_range must be [low, high] with 0 < low <= high, got {d.ratio_range!r}"
        )
    if not inf.scales or any(s <= 0 for s in inf.scales):
        raise ConfigError(f"inference.scales must be positive numbers, got {inf.scales!r}")
    if inf.mode == "slide":
        if inf.crop_size is None or inf.stride is None:
            raise ConfigError("inference.mode slide needs inference.crop_size and inference.stride")
        if any(s > c for s, c in zip(inf.stride, inf.crop_size, strict=True)):
            raise ConfigError(
                f"inference.stride {inf.stride} must not exceed inference.crop_size "
                f"{inf.crop_size} (windows would leave gaps)"
            )
    elif inf.crop_size is not None or inf.stride is not None:
        raise ConfigError(
            "inference.crop_size and inference.stride are the sliding windows of mode slide; "
            "remove them for mode whole"
        )


# FixMatch's unlabelled images per labelled image in a step
DEFAULT_UNLABELLED_RATIO = 7
# semi-supervised segmentation: as many unlabelled crops as labelled ones (each seen twice)
DEFAULT_SEGMENTATION_UNLABELLED_RATIO = 1


def _check_semi_supervised_settings(cfg: ExperimentConfig) -> None:
    """``data.labelled_fraction``, ``data.unlabelled_ratio`` and the ``semi`` section go
    together (classification, or segmentation of a ``kind:ROOT`` data set); fills in
    ``unlabelled_ratio``, the ``semi`` section and ``semi.sar_unlabelled`` when they are left
    out, so that a parsed config states them."""
    d = cfg.data
    if d.labelled_fraction is None:
        for given, key in (
            (d.unlabelled_ratio is not None, "data.unlabelled_ratio"),
            (cfg.semi is not None, "semi"),
        ):
            if given:
                raise ConfigError(
                    f"{key} is for semi-supervised training: it needs data.labelled_fraction "
                    "(the fraction of the training images whose labels are used, in (0, 1]); "
                    f"set it or remove {key}"
                )
        return
    kind, sep, root = d.source.partition(":")
    if cfg.task == "segmentation" and not (sep and root and kind in SEGMENTATION_KINDS):
        raise ConfigError(
            f"data.labelled_fraction={d.labelled_fraction}: semi-supervised segmentation "
            f"needs a data set in a standard layout ({', '.join(SEGMENTATION_KINDS)}:ROOT), "
            f"not {d.source!r}: remove the key"
        )
    if d.unlabelled_ratio is None:
        d.unlabelled_ratio = (
            DEFAULT_SEGMENTATION_UNLABELLED_RATIO
            if cfg.task == "segmentation"
            else DEFAULT_UNLABELLED_RATIO
        )
    if cfg.semi is None:
        cfg.semi = SemiConfig()
    semi = cfg.semi
    check_ranges(
        cfg,
        {
            "semi.threshold": ((lambda v: 0 <= v <= 1), "in [0, 1]"),
            "semi.unlabelled_weight": at_least(0),
        },
    )
    has_sar = any(spec.name in ("sar", "sar_plus") for spec in cfg.losses)
    if semi.sar_unlabelled is None:
        semi.sar_unlabelled = has_sar and semi.unlabelled_weight > 0
    elif semi.sar_unlabelled:
        if not has_sar:
            raise ConfigError(
                "semi.sar_unlabelled: true pulls pseudo-labelled features with the sar loss: "
                "add sar to losses or set semi.sar_unlabelled: false"
            )
        if semi.unlabelled_weight == 0:
            raise ConfigError(
                "semi.sar_unlabelled: true needs unlabelled batches, which "
                "semi.unlabelled_weight: 0 turns off (labelled images only): set "
                "semi.sar_unlabelled: false or a positive semi.unlabelled_weight"
            )
    if d.labelled_fraction == 1 and semi.unlabelled_weight > 0:
        raise ConfigError(
            f"data.labelled_fraction={d.labelled_fraction} labels every training image: no "
            "unlabelled image is "
            "left for the unlabelled batches; use a smaller fraction, or "
            "semi.unlabelled_weight: 0 to train on the labelled images alone"
        )
