"""Run an experiment end to end: data, model, objective, Lightning fit, test metrics, plots.

The plumbing that pretraining shares (device checks, checkpoints, resume checks, the
trainer) is :mod:`~anchorlearn.engine.runs`'s.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from anchorlearn.models.encoders import IMAGENET_MEAN, IMAGENET_STD
from anchorlearn.models.etf import FixedETFModel

from .config import (
    DEFAULT_SEGMENTATION_UNLABELLED_RATIO,
    DEFAULT_UNLABELLED_RATIO,
    ExperimentConfig,
    SemiConfig,
    parse_config,
)
from .datamodules import ClassificationDataModule, SegmentationDataModule
from .evaluate import evaluate_module, write_run_plots
from .module import SupervisedModule, training_counts
from .objective import LOSSES, build_objective
from .rundir import (
    DATA_FINGERPRINT_KEY,
    RunError,
    check_output_dir,
    check_output_file,
    is_secondary_rank,
    lock_run_dir,
    write_json,
)
from .runs import (
    CONFIG_KEY,
    StoreConfig,
    TrainClock,
    create_model_for_data,
    eval_device,
    load_checkpoint,
    make_trainer,
    open_run,
    refuse_changed_config,
    restore_run,
    resume_differences,
)
from .schema import ConfigError, config_to_dict
from .segmentation import (
    SegmentationFilesDataModule,
    SegmentationModule,
    evaluate_segmentation,
    is_segmentation_dataset,
)
from .semi import SemiSupervisedModule, SemiSupervisedSegmentationModule

__all__ = [
    "RunError",
    "build_datamodule",
    "build_run",
    "check_compatible",
    "evaluate_checkpoint",
    "fit",
    "load_run",
    "reuse_class_counts",
    "write_class_counts",
]


def build_datamodule(cfg: ExperimentConfig):
    d = cfg.data
    files = is_segmentation_dataset(d.source)
    if files and cfg.task != "segmentation":
        raise ConfigError(
            f"data.source {d.source!r} is a segmentation data set: set task: segmentation"
        )
    if files != (cfg.trainer.max_steps is not None):
        raise ConfigError(
            f"data.source {d.source!r}: "
            + (
                "segmentation data sets train by iterations: set trainer.max_steps"
                if files
                else "trainer.max_steps (iteration-based training) is for the segmentation data "
                "sets (ade20k:, cityscapes:, pascal_context:, voc:, camvid:); this source trains "
                "by epochs (trainer.max_epochs)"
            )
        )
    if files:
        if d.crop_size is None:
            raise ConfigError(f"data.source {d.source!r} needs data.crop_size: [h, w]")
        dm = SegmentationFilesDataModule(
            d.source,
            crop_size=tuple(d.crop_size),
            base_size=None if d.base_size is None else tuple(d.base_size),
            ratio_range=tuple(d.ratio_range),
            cat_max_ratio=d.cat_max_ratio,
            photometric=d.photometric,
            batch_size=d.batch_size,
            eval_batch_size=cfg.inference.batch_size,
            num_workers=d.num_workers,
            seed=cfg.seed,
            max_steps=cfg.trainer.max_steps,
            accumulate_grad_batches=cfg.trainer.accumulate_grad_batches,
            splits=(d.train_split, d.val_split, d.test_split),
            **_semi_supervised_data(cfg),
        )
    elif cfg.task == "classification":
        dm = ClassificationDataModule(
            source=d.source,
            imbalance_ratio=d.imbalance_ratio,
            profile=d.profile,
            val_fraction=d.val_fraction,
            batch_size=d.batch_size,
            num_workers=d.num_workers,
            max_train_samples=d.max_train_samples,
            max_test_samples=d.max_test_samples,
            augment=d.augment,
            seed=cfg.seed,
            **_semi_supervised_data(cfg),
        )
    else:
        dm = SegmentationDataModule(
            source=d.source,
            canvas=d.canvas,
            num_train=d.num_train_scenes,
            num_val=d.num_val_scenes,
            imbalance_ratio=d.scene_imbalance_ratio,
            val_fraction=d.val_fraction,
            batch_size=d.batch_size,
            num_workers=d.num_workers,
            augment=d.augment,
            seed=cfg.seed,
        )
    try:
        dm.setup("fit")
    except FileNotFoundError as err:
        raise RunError(" ".join(str(err).split())) from err
    except ValueError as err:
        if not files or "split" not in str(err):
            raise
        raise RunError(
            f"{' '.join(str(err).split())} (the run's splits: data.train_split="
            f"{d.train_split!r}, data.val_split={d.val_split!r}, data.test_split="
            f"{d.test_split!r})"
        ) from err
    return dm


def _semi_supervised_data(cfg: ExperimentConfig) -> dict[str, Any]:
    """The data module's semi-supervised arguments (none without
    ``data.labelled_fraction``, so that the default data module is built as before)."""
    d = cfg.data
    if d.labelled_fraction is None:
        return {}
    semi = cfg.semi or SemiConfig()
    return {
        "labelled_fraction": d.labelled_fraction,
        "unlabelled_ratio": d.unlabelled_ratio
        or (
            DEFAULT_SEGMENTATION_UNLABELLED_RATIO
            if cfg.task == "segmentation"
            else DEFAULT_UNLABELLED_RATIO
        ),
        # unlabelled_weight 0: the labelled images alone (sar_unlabelled is then false)
        "unlabelled_batches": semi.unlabelled_weight > 0 or bool(semi.sar_unlabelled),
    }


def build_run(cfg: ExperimentConfig) -> tuple[Any, SupervisedModule]:
    """The data module and the Lightning module of a config, validated against each other."""
    dm = build_datamodule(cfg)
    model = create_model_for_data(cfg.model.name, cfg.model.kwargs, dm, cfg.data.source)
    if cfg.model.etf_classifier:
        model = FixedETFModel(
            model,
            dm.num_classes,
            dense=cfg.task == "segmentation",
            geometry=cfg.model.classifier_geometry,
        )
    # counting a segmentation data set's pixels reads every training mask: only when a loss
    # needs the counts (the final evaluation counts them once, for its head / tail groups)
    needs_counts = any(
        (spec.name in LOSSES and "class_counts" in LOSSES[spec.name].injected)
        or "class_weights" in spec.params  # SAR's class-balanced pull, by name
        for spec in cfg.losses
    )
    lazy = isinstance(dm, SegmentationFilesDataModule) and not needs_counts
    counts = None if lazy else training_counts(dm)
    # segmentation masks mark void pixels; every classification label is a class (a data
    # set of 256+ classes has a class 255)
    ignore_index = getattr(dm, "ignore_index", None)
    objective = build_objective(
        cfg.losses,
        model=model,
        num_classes=dm.num_classes,
        class_counts=counts,
        ignore_index=ignore_index,
    )
    if isinstance(dm, SegmentationFilesDataModule):
        dm.set_normalization(
            getattr(model, "input_mean", IMAGENET_MEAN), getattr(model, "input_std", IMAGENET_STD)
        )
        seg_args: dict[str, Any] = {
            "num_classes": dm.num_classes,
            "inference": cfg.inference,
            "seed": cfg.seed,
            "channels_last": cfg.trainer.channels_last,
        }
        if dm.semi_supervised:
            module: SupervisedModule = SemiSupervisedSegmentationModule(
                model, objective, cfg.optim, **seg_args, **_semi_module_args(cfg)
            )
        else:
            module = SegmentationModule(model, objective, cfg.optim, **seg_args)
    elif getattr(dm, "semi_supervised", False):
        module = SemiSupervisedModule(
            model,
            objective,
            cfg.optim,
            num_classes=dm.num_classes,
            seed=cfg.seed,
            **_semi_module_args(cfg),
        )
    else:
        module = SupervisedModule(
            model,
            objective,
            cfg.optim,
            task=cfg.task,
            num_classes=dm.num_classes,
            ignore_index=ignore_index,
            seed=cfg.seed,
        )
    if not isinstance(dm, SegmentationFilesDataModule) and cfg.trainer.channels_last:
        module.model.to(memory_format=torch.channels_last)
    return dm, module


def _semi_module_args(cfg: ExperimentConfig) -> dict[str, Any]:
    semi = cfg.semi or SemiConfig()
    return {
        "threshold": semi.threshold,
        "unlabelled_weight": semi.unlabelled_weight,
        "sar_unlabelled": bool(semi.sar_unlabelled),
    }


def check_compatible(ckpt: dict, cfg: ExperimentConfig, path: Path) -> None:
    """Resuming ``cfg`` from ``ckpt`` is allowed only if nothing but
    :data:`~.runs.RESUMABLE_CHANGES` differs (model, data, losses, optimiser, seed, devices)."""
    try:
        stored = config_to_dict(parse_config(ckpt[CONFIG_KEY]))
    except ConfigError as err:
        raise RunError(f"{path} holds a config this version cannot read: {err}") from err
    refuse_changed_config(resume_differences(stored, config_to_dict(cfg)), path)


def fit(
    cfg: ExperimentConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    quiet: bool = False,
    plots: bool = True,
    callbacks: list[L.Callback] | None = None,
    allow_data_change: bool = False,
) -> dict[str, Any] | None:
    """Train ``cfg`` into ``run_dir`` and evaluate it on the test split.

    Returns the test metrics on global rank 0 (``None`` on other ranks). With ``resume``
    an interrupted run continues from ``run_dir/checkpoints/last.ckpt``; without it, a
    ``run_dir`` that already holds a checkpoint is an error rather than overwritten.
    ``plots=False`` skips the pictures (t-SNE takes a while on a CPU); ``callbacks`` are
    added to the Lightning trainer.

    The run holds ``run_dir`` exclusively while it runs (:func:`~.rundir.lock_run_dir`):
    another process training into it is refused at once. The fingerprint of the data
    (``dm.data_fingerprint()``) is written to ``run_dir/data_fingerprint.json`` and stored
    in every checkpoint; resuming on data that changed since is refused unless
    ``allow_data_change``.
    """
    run_dir = Path(run_dir)
    with lock_run_dir(run_dir):
        return _fit_locked(cfg, run_dir, resume, quiet, plots, callbacks or [], allow_data_change)


def _fit_locked(
    cfg: ExperimentConfig,
    run_dir: Path,
    resume: bool,
    quiet: bool,
    plots: bool,
    callbacks: list[L.Callback],
    allow_data_change: bool,
) -> dict[str, Any] | None:
    t = cfg.trainer
    config = config_to_dict(cfg)
    ckpt_path, dm, module, fingerprint = open_run(
        run_dir,
        t,
        cfg.seed,
        config,
        resume=resume,
        load=load_checkpoint,
        check_resumable=lambda ckpt, path: check_compatible(ckpt, cfg, path),
        build=lambda: build_run(cfg),
        allow_data_change=allow_data_change,
    )
    # a segmentation data set's pixel counts are written after training (counted once then)
    if not is_secondary_rank() and not isinstance(dm, SegmentationFilesDataModule):
        write_class_counts(dm, run_dir)

    clock = TrainClock()
    trainer = make_trainer(
        t,
        run_dir,
        [
            StoreConfig(CONFIG_KEY, config),
            StoreConfig(DATA_FINGERPRINT_KEY, fingerprint),
            clock,
            *callbacks,
        ],
        quiet=quiet,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
    if not trainer.is_global_zero:
        return None
    module.to(trainer.strategy.root_device)  # Lightning's teardown moved it to the CPU
    outputs = None
    if isinstance(dm, SegmentationFilesDataModule):
        reuse_class_counts(dm, run_dir)  # a resumed run counted them before
        metrics, outputs = evaluate_segmentation(module, dm, progress=not quiet)
        metrics["steps"] = int(trainer.global_step)
        write_class_counts(dm, run_dir)
    else:
        metrics = evaluate_module(module, dm, task=cfg.task)
        metrics["epochs"] = int(trainer.current_epoch)
    metrics.update(_image_counts(dm))
    metrics["train_seconds"] = round(clock.seconds, 1)
    if t.devices > 1:
        metrics["ddp_world_size"] = int(trainer.world_size)
        metrics["ddp_max_state_diff"] = module.rank_state_divergence
        metrics["ddp_most_divergent_buffer"] = module.most_divergent_buffer
    write_json(run_dir / "metrics.json", metrics)
    if plots and cfg.eval.plots:
        write_run_plots(
            module,
            dm,
            run_dir,
            task=cfg.task,
            outputs=outputs,
            name=cfg.name,
            max_points=cfg.eval.tsne_points,
        )
    return metrics


def load_run(
    path: str | Path,
    *,
    inference: dict[str, Any] | None = None,
    allow_data_change: bool = False,
) -> tuple[ExperimentConfig, Any, SupervisedModule]:
    """The config, data module and trained module stored in a checkpoint written by
    :func:`fit`. ``inference`` overrides settings of the run's ``inference`` section (they
    do not change the model, so any checkpoint of the run fits).

    The data are those the run trained on, or a :class:`RunError` says what changed
    (:func:`~.rundir.check_data_fingerprint`; ``allow_data_change`` makes it a warning).
    """
    path = Path(path)
    ckpt = load_checkpoint(path)
    raw = ckpt[CONFIG_KEY]
    if inference:
        current = dict(raw.get("inference", {}))
        if inference.get("mode") == "whole":  # the sliding windows of the run do not apply
            current.pop("crop_size", None)
            current.pop("stride", None)
        raw = {**raw, "inference": {**current, **inference}}
    cfg = parse_config(raw)
    # the checkpoint holds every weight: the pretrained-weight source the run started from
    # (a file, a package, timm's cache) is not needed, nor loaded, to rebuild it
    for key, unused in (("encoder_weights", None), ("pretrained", False)):
        if key in cfg.model.kwargs:
            cfg.model.kwargs[key] = unused
    dm, module = restore_run(
        ckpt,
        path,
        lambda: build_run(cfg),
        action="evaluate",
        allow_data_change=allow_data_change,
    )
    return cfg, dm, module


def evaluate_checkpoint(
    path: str | Path,
    *,
    out: str | Path | None = None,
    split: str = "test",
    inference: dict[str, Any] | None = None,
    save_masks: str | Path | None = None,
    accelerator: str = "cpu",
    precision: str = "32",
    allow_data_change: bool = False,
) -> dict[str, Any]:
    """Rebuild the run stored in a checkpoint and evaluate it on its ``split``: ``"test"``,
    or ``"val"`` (the part of the training data the run held out) for choosing settings
    without touching the test split.

    ``out`` (a JSON file, undefined metrics as ``null``) and ``save_masks`` are checked to
    be writable before anything is loaded. Data that changed since the run trained are
    refused (see :func:`load_run`) unless ``allow_data_change``.

    Segmentation data sets only: ``inference`` overrides settings of the run's
    ``inference`` section (``{"mode": "slide", "crop_size": [512, 512], ...}``), and
    ``save_masks`` is a directory for colour-coded prediction PNGs. ``accelerator``
    (``"cpu"``, ``"gpu"``/``"cuda"`` or ``"auto"``) and ``precision`` (``"32"``, or
    ``"bf16"`` / ``"16"`` autocast) say where and how the network runs.
    """
    device = eval_device(accelerator)
    if precision not in ("32", "bf16", "16"):
        raise RunError(f"precision must be one of 32, bf16, 16, got {precision!r}")
    if out is not None:
        check_output_file(out, "--out")
    if save_masks is not None:
        check_output_dir(save_masks, "--save-masks")
    cfg, dm, module = load_run(path, inference=inference, allow_data_change=allow_data_change)
    reuse_class_counts(dm, Path(path).parent.parent)  # run_dir/checkpoints/last.ckpt
    if not isinstance(dm, SegmentationFilesDataModule) and (inference or save_masks is not None):
        raise RunError(
            "inference settings and --save-masks apply to segmentation data sets "
            f"(ade20k:, cityscapes:, ...); {path} was trained on {cfg.data.source!r}"
        )
    module.to(device)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
        if precision != "32"
        else contextlib.nullcontext()
    )
    with autocast:
        if isinstance(dm, SegmentationFilesDataModule):
            metrics, _ = evaluate_segmentation(module, dm, split=split, save_masks=save_masks)
        else:
            metrics = evaluate_module(module, dm, task=cfg.task, split=split)
    metrics["split"] = split
    if out is not None:
        write_json(out, metrics)
    return metrics


CLASS_COUNTS_FILE = "class_counts.json"


def write_class_counts(dm: Any, run_dir: Path) -> None:
    """``run_dir/class_counts.json``: the training images (or pixels) per class."""
    counts = training_counts(dm)
    if counts is not None:
        names = list(getattr(dm, "class_names", [str(i) for i in range(len(counts))]))
        payload = {
            "train_class_counts": {n: int(c) for n, c in zip(names, counts, strict=True)},
            "total": int(np.sum(counts)),
        }
        # semi-supervised: the counts above are the labelled images'
        payload.update(_image_counts(dm))
        write_json(run_dir / CLASS_COUNTS_FILE, payload)
        print(f"class counts (train): {payload['train_class_counts']}", file=sys.stderr)


def _image_counts(dm: Any) -> dict[str, int]:
    """``{"labelled_images", "unlabelled_images"}`` of a semi-supervised run, else empty."""
    image_counts = getattr(dm, "image_counts", None)
    return (image_counts() if callable(image_counts) else None) or {}


def reuse_class_counts(dm: Any, run_dir: Path) -> None:
    """Give a segmentation data module the pixel counts its run wrote, if it wrote them
    (counting reads every training mask again)."""
    path = run_dir / CLASS_COUNTS_FILE
    if isinstance(dm, SegmentationFilesDataModule) and path.is_file():
        counts = json.loads(path.read_text())["train_class_counts"]
        if list(counts) == dm.class_names:
            dm.set_pixel_counts(list(counts.values()))
