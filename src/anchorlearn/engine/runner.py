"""Run an experiment end to end: data, model, objective, Lightning fit, test metrics, plots."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from anchorlearn.models import create_model
from anchorlearn.models.encoders import IMAGENET_MEAN, IMAGENET_STD
from anchorlearn.models.etf import FixedETFModel

from .config import ConfigError, ExperimentConfig, TrainerConfig, config_to_dict, parse_config
from .datamodules import ClassificationDataModule, SegmentationDataModule
from .evaluate import evaluate_module, write_run_plots
from .module import SupervisedModule, training_counts
from .objective import LOSSES, build_objective
from .progress import ProgressLines, QuietTrainer, terminal_attached
from .rundir import (
    DATA_FINGERPRINT_FILE,
    DATA_FINGERPRINT_KEY,
    RunError,
    check_data_fingerprint,
    check_output_dir,
    check_output_file,
    is_secondary_rank,
    lock_run_dir,
    write_json,
)
from .segmentation import (
    SegmentationFilesDataModule,
    SegmentationModule,
    StepCheckpoint,
    evaluate_segmentation,
    is_segmentation_dataset,
)

__all__ = [
    "FINISHED_RUN_CHANGES",
    "RunError",
    "StoreConfig",
    "TrainClock",
    "build_run",
    "check_devices",
    "check_finished_run",
    "check_precision",
    "config_differences",
    "create_model_for_data",
    "evaluate_checkpoint",
    "fit",
    "load_checkpoint",
    "load_run",
    "load_weights",
    "make_trainer",
    "read_checkpoint",
    "resume_differences",
    "start_run",
]

CONFIG_KEY = "anchorlearn_config"


def _resolve_accelerator(accelerator: str) -> str:
    """What Lightning's ``auto`` picks here: a CUDA GPU, else Apple's MPS, else the CPU."""
    if accelerator != "auto":
        return "gpu" if accelerator == "cuda" else accelerator
    if torch.cuda.device_count() > 0:
        return "gpu"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def check_devices(accelerator: str, devices: int) -> None:
    """Fail before training when more devices are asked for than exist."""
    if devices < 1:
        raise RunError(f"--devices must be >= 1, got {devices}")
    resolved = _resolve_accelerator(accelerator)
    via = " (what --accelerator auto picks here)" if accelerator == "auto" else ""
    if resolved == "gpu":
        available = torch.cuda.device_count()
        if available == 0:
            raise RunError(
                "accelerator gpu asked for but no CUDA device is visible: use --accelerator cpu"
            )
        if devices > available:
            raise RunError(
                f"--devices {devices} asked for but only {available} GPU(s) are visible{via}: "
                f"use --devices {available} or fewer"
            )
    elif resolved == "mps":
        if not torch.backends.mps.is_available():
            raise RunError(
                "accelerator mps asked for but MPS is not available: use --accelerator cpu"
            )
        if devices > 1:
            raise RunError(
                f"--devices {devices} asked for but MPS has one device{via}: use --devices 1"
            )
    else:
        cores = os.cpu_count() or 1
        if devices > cores:
            raise RunError(
                f"--devices {devices} CPU processes asked for but this machine has {cores} "
                f"core(s){via}: use --devices {cores} or fewer"
            )


def check_precision(accelerator: str, precision: str) -> None:
    """Refuse float16 mixed precision where it cannot run: on the CPU, Lightning would
    silently train in bfloat16 instead while the run's config says ``16-mixed``."""
    if precision in ("16-mixed", "16") and _resolve_accelerator(accelerator) == "cpu":
        via = " (what --accelerator auto picks here)" if accelerator == "auto" else ""
        raise RunError(
            f"precision {precision} needs a CUDA GPU; on the CPU{via} use bf16-mixed (or 32-true)"
        )


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


def build_run(cfg: ExperimentConfig) -> tuple[Any, SupervisedModule]:
    """The data module and the Lightning module of a config, validated against each other."""
    dm = build_datamodule(cfg)
    model = create_model_for_data(cfg.model.name, cfg.model.kwargs, dm, cfg.data.source)
    if cfg.model.etf_classifier:
        model = FixedETFModel(model, dm.num_classes, dense=cfg.task == "segmentation")
    # counting a segmentation data set's pixels reads every training mask: only when a loss
    # needs the counts (the final evaluation counts them once, for its head / tail groups)
    needs_counts = any(
        spec.name in LOSSES and "class_counts" in LOSSES[spec.name].injected for spec in cfg.losses
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
        module: SupervisedModule = SegmentationModule(
            model,
            objective,
            cfg.optim,
            num_classes=dm.num_classes,
            inference=cfg.inference,
            seed=cfg.seed,
            channels_last=cfg.trainer.channels_last,
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
        if cfg.trainer.channels_last:
            module.model.to(memory_format=torch.channels_last)
    return dm, module


def create_model_for_data(name: str, kwargs: dict, dm: Any, source: str) -> nn.Module:
    """``create_model(name, **kwargs)`` with the class and channel counts taken from the
    data module; a config that states them differently is an error."""
    kwargs = dict(kwargs)
    for key, value in (("num_classes", dm.num_classes), ("in_channels", dm.in_channels)):
        if key in kwargs and kwargs[key] != value:
            raise RunError(
                f"model.kwargs.{key}={kwargs[key]} but the data set {source!r} has "
                f"{key}={value}: remove model.kwargs.{key} (it is taken from the data)"
            )
        kwargs[key] = value
    try:
        return create_model(name, **kwargs)
    except (TypeError, ValueError, ImportError) as err:
        raise ConfigError(f"model {name!r}: {err}") from err


class StoreConfig(L.Callback):
    """Stores ``payload`` (a resolved config as a dict, or the data fingerprint) under
    ``key`` in every checkpoint, so that the run can be checked on resume and rebuilt
    from the checkpoint alone."""

    def __init__(self, key: str, payload: dict) -> None:
        self.key = key
        self.payload = payload

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[self.key] = self.payload


class TrainClock(L.Callback):
    """Training wall time summed over epochs and over resumed attempts (kept in checkpoints)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds += time.perf_counter() - self._start

    def state_dict(self) -> dict:
        return {"seconds": self.seconds}

    def load_state_dict(self, state_dict: dict) -> None:
        self.seconds = float(state_dict.get("seconds", 0.0))


def _load_failure(err: Exception) -> str:
    """The gist of a ``torch.load`` error, on one short line: the first sentence of its
    unpickler reason, without torch's advice to load with ``weights_only=False`` (which
    would run arbitrary code)."""
    text = " ".join(str(err).split())
    text = text.split("WeightsUnpickler error: ", 1)[-1]
    text = text.split(" Check the documentation", 1)[0].split(". ", 1)[0]
    return text if len(text) <= 160 else text[:157] + "..."


def read_checkpoint(path: str | Path) -> dict:
    """Load any checkpoint safely (``weights_only=True``: loading never runs code)."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RunError(
            f"{path} is not a loadable anchorlearn checkpoint ({_load_failure(err)}); pass a "
            "last.ckpt written by `anchorlearn fit` or `anchorlearn pretrain`"
        ) from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise RunError(f"{path} is not an anchorlearn checkpoint (no state_dict)")
    return ckpt


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by :func:`fit`, loaded safely."""
    ckpt = read_checkpoint(path)
    if CONFIG_KEY not in ckpt:
        if any(key.startswith("anchorlearn_pretrain") for key in ckpt):
            raise RunError(
                f"{path} was written by `anchorlearn pretrain`: use `anchorlearn probe` on it"
            )
        raise RunError(f"{path} is not an anchorlearn checkpoint (no stored config)")
    return ckpt


def start_run(
    run_dir: Path, t: TrainerConfig, seed: int, resume: bool, check: Callable[[Path], None]
) -> str | None:
    """Checks that come before anything is written, then seeds every generator.

    Fails when ``t`` asks for more devices than exist or for float16 on a CPU. Returns the
    checkpoint to continue from: ``None`` for a fresh run directory (with ``resume``, a
    line on stderr says that it starts afresh); with ``resume`` its ``last.ckpt`` after
    ``check(path)``; an error when it holds one and ``resume`` is off (a finished or
    interrupted run is never overwritten)."""
    check_devices(t.accelerator, t.devices)
    check_precision(t.accelerator, t.precision)
    if (
        t.sync_batchnorm
        and t.devices * t.num_nodes > 1
        and _resolve_accelerator(t.accelerator) != "gpu"
    ):
        raise RunError(
            "trainer.sync_batchnorm needs GPUs (torch's SyncBatchNorm does not run on the "
            f"{_resolve_accelerator(t.accelerator)}): set trainer.sync_batchnorm=false; the "
            "processes' BatchNorm statistics are then averaged before validation and checkpoints"
        )
    ckpt_path = _resume_from(run_dir, resume, check)
    L.seed_everything(seed, workers=True, verbose=False)
    return ckpt_path


def _resume_from(run_dir: Path, resume: bool, check: Callable[[Path], None]) -> str | None:
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.exists():
        if resume and not is_secondary_rank():
            print(
                f"--resume: {run_dir} holds no checkpoint (checkpoints/last.ckpt): starting a "
                "fresh run",
                file=sys.stderr,
            )
        return None
    if not resume:
        raise RunError(
            f"{run_dir} already holds a checkpoint: pass --resume to continue it, or "
            "choose another --out"
        )
    check(last)
    return str(last)


def make_trainer(
    t: TrainerConfig,
    run_dir: Path,
    callbacks: list[L.Callback],
    *,
    quiet: bool,
    **extra: Any,
) -> L.Trainer:
    """A Lightning trainer writing ``run_dir/checkpoints/last.ckpt`` every epoch and CSV logs
    under ``run_dir/logs``; DDP when ``t.devices > 1``. ``extra`` goes to ``L.Trainer``.

    Unless ``quiet``: Lightning's progress bar when ``t.progress`` and standard output and
    error are terminals, otherwise one line per epoch (per validation with ``t.max_steps``)
    on standard error (:class:`~anchorlearn.engine.progress.ProgressLines`). Lightning's
    tips and known noise are silenced while the trainer is built and fitted
    (:class:`~anchorlearn.engine.progress.QuietTrainer`)."""
    # last.ckpt rewritten at the end of every epoch (save_last with save_top_k=0 would only
    # write it when training ends, leaving an interrupted run nothing to resume from); no
    # version counter, so a moved run directory keeps writing last.ckpt, never last-v1.ckpt.
    if t.max_steps is None:
        checkpoint: L.Callback = ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename="last",
            monitor=None,
            save_top_k=1,
            every_n_epochs=1,
            save_on_train_epoch_end=True,
            enable_version_counter=False,
        )
        schedule: dict[str, Any] = {"max_epochs": t.max_epochs}
    else:
        # one stream of batches (StepSampler): validation and checkpoints every N steps
        checkpoint = StepCheckpoint(run_dir / "checkpoints", checkpoint_interval(t))
        batches = t.accumulate_grad_batches
        schedule = {
            "max_steps": t.max_steps,
            "max_epochs": -1,
            "val_check_interval": (t.val_every_n_steps or t.max_steps) * batches,
            "check_val_every_n_epoch": None,
            "use_distributed_sampler": False,
            "enable_checkpointing": False,  # StepCheckpoint writes last.ckpt
        }
    callbacks = [checkpoint, *callbacks]
    # the bar on a terminal; one plain line per epoch (or validation) anywhere else
    bar = t.progress and not quiet and terminal_attached()
    if bar:
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    elif not quiet:
        callbacks.append(ProgressLines("epoch" if t.max_steps is None else "validation"))
    distributed = t.devices * t.num_nodes > 1
    return QuietTrainer(
        **schedule,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        # No buffer broadcast from rank 0: the objectives keep their own state identical
        # across ranks (all-reduced EMA statistics, the E-step's broadcast), which
        # ddp_max_state_diff then really checks.
        strategy=DDPStrategy(broadcast_buffers=False) if distributed else "auto",
        precision=t.precision,
        sync_batchnorm=t.sync_batchnorm and distributed,
        accumulate_grad_batches=t.accumulate_grad_batches,
        # One log folder per attempt (version_0, version_1 after a resume, ...): a resumed
        # run never deletes the logs of the attempt it continues.
        logger=CSVLogger(run_dir, name="logs"),
        callbacks=callbacks,
        log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=bar,
        enable_model_summary=False,
        deterministic=t.deterministic,
        default_root_dir=run_dir,
        **extra,
    )


def checkpoint_interval(t: TrainerConfig) -> int:
    """Steps between checkpoints of an iteration-based run: ``checkpoint_every_n_steps``,
    by default ``val_every_n_steps`` or a tenth of the run (at most 1,000 steps)."""
    if t.checkpoint_every_n_steps is not None:
        return t.checkpoint_every_n_steps
    if t.val_every_n_steps is not None:
        return t.val_every_n_steps
    return max(1, min(1000, t.max_steps // 10))


# Settings that may differ between a run and the config asked for, whether the run is
# resumed or reused finished: how it reports and where it computes (the batches do not
# depend on them).
FINISHED_RUN_CHANGES = frozenset(
    {
        "name",
        "out_dir",
        "trainer.progress",
        "trainer.log_every_n_steps",
        "trainer.accelerator",
        "trainer.val_every_n_steps",
        "trainer.checkpoint_every_n_steps",
        "eval.plots",
        "eval.tsne_points",
    }
)
# A resumed run may also train for longer, but only under a constant learning rate: a cosine
# schedule is laid out over trainer.max_epochs, so a longer resumed run would continue a
# different curve (see resume_differences).
RESUMABLE_CHANGES = FINISHED_RUN_CHANGES | {"trainer.max_epochs", "trainer.max_steps"}


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}


def config_differences(
    stored: dict, current: dict, allowed: frozenset[str] = RESUMABLE_CHANGES
) -> list[str]:
    """``key: stored -> current`` for every setting (dotted key) that differs, except the
    ``allowed`` ones and those under an allowed prefix ending in ``.*``."""
    old, new = _flatten(stored), _flatten(current)
    prefixes = tuple(a[:-1] for a in allowed if a.endswith(".*"))
    return [
        f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key) and key not in allowed and not key.startswith(prefixes)
    ]


def resume_differences(
    stored: dict, current: dict, allowed: frozenset[str] = RESUMABLE_CHANGES
) -> list[str]:
    """:func:`config_differences`, plus ``trainer.max_epochs`` when the learning-rate
    schedule is not constant (its length is the cosine's length)."""
    differences = config_differences(stored, current, allowed)
    schedule = current["optim"]["schedule"]
    for key in ("max_epochs", "max_steps"):
        old, new = stored["trainer"].get(key), current["trainer"].get(key)
        if old != new and schedule != "constant":
            differences.append(
                f"trainer.{key}: {old!r} -> {new!r} (the {schedule} learning-rate schedule "
                "is laid out over it; only a constant schedule may be extended)"
            )
    return differences


def check_finished_run(
    run_dir: Path,
    current: dict,
    read: Callable[[dict], dict],
    allowed: frozenset[str] = FINISHED_RUN_CHANGES,
) -> None:
    """Refuse to reuse the finished run in ``run_dir`` for the config ``current`` (a dict)
    unless its ``config.yaml``, normalised by ``read``, differs only in ``allowed`` keys."""
    stored_path = Path(run_dir) / "config.yaml"
    if not stored_path.exists():
        raise RunError(f"{run_dir} has metrics.json but no config.yaml: cannot tell how it ran")
    try:
        stored = read(yaml.safe_load(stored_path.read_text()))
    except ConfigError as err:
        raise RunError(f"{stored_path} holds a config this version cannot read: {err}") from err
    differences = config_differences(stored, current, allowed)
    if differences:
        raise RunError(
            f"{run_dir} is a finished run with other settings ({'; '.join(differences)}): "
            "use another output directory, or delete that run to train it again"
        )


def refuse_changed_config(differences: list[str], path: Path) -> None:
    """A run resumes only with the settings it was started with (see RESUMABLE_CHANGES)."""
    if differences:
        raise RunError(
            f"{path} was trained with other settings; a resumed run must keep them "
            f"(only {', '.join(sorted(FINISHED_RUN_CHANGES))} and, under a constant schedule, "
            "trainer.max_epochs may change): "
            + "; ".join(differences)
            + ". Use another --out for the new settings."
        )


def check_compatible(ckpt: dict, cfg: ExperimentConfig, path: Path) -> None:
    """Resuming ``cfg`` from ``ckpt`` is allowed only if nothing but
    :data:`RESUMABLE_CHANGES` differs (model, data, losses, optimiser, seed, devices)."""
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
    stored: dict[str, Any] = {}

    def check(last: Path) -> None:
        ckpt = load_checkpoint(last)
        check_compatible(ckpt, cfg, last)
        stored["fingerprint"] = ckpt.get(DATA_FINGERPRINT_KEY)

    ckpt_path = start_run(run_dir, t, cfg.seed, resume, check)
    dm, module = build_run(cfg)
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
    _write_run_header(cfg, dm, run_dir, fingerprint)

    clock = TrainClock()
    trainer = make_trainer(
        t,
        run_dir,
        [
            StoreConfig(CONFIG_KEY, config_to_dict(cfg)),
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


def _eval_device(accelerator: str) -> torch.device:
    resolved = _resolve_accelerator(accelerator)
    if resolved == "gpu":
        if torch.cuda.device_count() == 0:
            raise RunError("--accelerator gpu asked for but no CUDA device is visible")
        return torch.device("cuda")
    if resolved == "mps":
        return torch.device("mps")
    return torch.device("cpu")


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
    dm, module = build_run(cfg)
    check_data_fingerprint(
        ckpt.get(DATA_FINGERPRINT_KEY),
        dm.data_fingerprint(),
        checkpoint=path,
        action="evaluate",
        allow=allow_data_change,
    )
    load_weights(module, ckpt["state_dict"], path)
    return cfg, dm, module


def _listed(keys: list[str], limit: int = 5) -> str:
    """``a, b, c`` or, past ``limit`` keys, ``a, ..., e and 12 more``."""
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown} and {len(keys) - limit} more"


def _counted(keys: list[str], what: str) -> str:
    return f"{len(keys)} {what if len(keys) == 1 else what.replace('key', 'keys')} " + (
        f"({_listed(keys)})"
    )


def load_weights(module: nn.Module, state_dict: dict[str, Any], path: str | Path) -> None:
    """``module.load_state_dict(state_dict)`` (strict). A checkpoint that does not fit is a
    one-line :class:`RunError` giving the number of missing, unexpected and differently
    shaped keys, with at most five names of each (torch's own message lists them all)."""
    expected = module.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    shaped = [
        f"{key}: {tuple(state_dict[key].shape)} in the checkpoint, "
        f"{tuple(expected[key].shape)} in the model"
        for key in expected
        if key in state_dict
        and hasattr(state_dict[key], "shape")
        and hasattr(expected[key], "shape")
        and tuple(state_dict[key].shape) != tuple(expected[key].shape)
    ]
    problems = [
        _counted(keys, what)
        for keys, what in (
            (missing, "missing key"),
            (unexpected, "unexpected key"),
            (shaped, "key of another shape"),
        )
        if keys
    ]
    if not problems:
        try:
            module.load_state_dict(state_dict)
            return
        except RuntimeError as err:
            problems = [" ".join(str(err).split())[:300]]
    raise RunError(f"{path} does not match its own config: {'; '.join(problems)}")


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
    device = _eval_device(accelerator)
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


def _write_run_header(
    cfg: ExperimentConfig, dm: Any, run_dir: Path, fingerprint: dict[str, Any]
) -> None:
    if is_secondary_rank():  # rank 0 wrote them before it started this process
        return
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    write_json(run_dir / DATA_FINGERPRINT_FILE, fingerprint)
    # a segmentation data set's pixel counts are written after training (counted once then)
    if not isinstance(dm, SegmentationFilesDataModule):
        write_class_counts(dm, run_dir)


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
        write_json(run_dir / CLASS_COUNTS_FILE, payload)
        print(f"class counts (train): {payload['train_class_counts']}", file=sys.stderr)


def reuse_class_counts(dm: Any, run_dir: Path) -> None:
    """Give a segmentation data module the pixel counts its run wrote, if it wrote them
    (counting reads every training mask again)."""
    path = run_dir / CLASS_COUNTS_FILE
    if isinstance(dm, SegmentationFilesDataModule) and path.is_file():
        counts = json.loads(path.read_text())["train_class_counts"]
        if list(counts) == dm.class_names:
            dm.set_pixel_counts(list(counts.values()))
