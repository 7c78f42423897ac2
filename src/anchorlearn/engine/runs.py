"""What every training run shares, supervised (:mod:`~anchorlearn.engine.runner`) or
self-supervised (:mod:`~anchorlearn.engine.ssl_runner`): device checks, safe checkpoint
reading, the start of a run (fresh or resumed, with its resume checks), the Lightning
trainer, the callbacks that store a run's config and time it, and the rebuilding of a run
from its checkpoint."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from anchorlearn.models import create_model

from .config import TrainerConfig
from .progress import InterruptNotice, ProgressLines, QuietTrainer, terminal_attached
from .rundir import (
    DATA_FINGERPRINT_FILE,
    DATA_FINGERPRINT_KEY,
    RunError,
    check_data_fingerprint,
    checkpoint_dir,
    is_secondary_rank,
    last_checkpoint,
    write_json,
)
from .schema import ConfigError
from .segmentation import StepCheckpoint

__all__ = [
    "CONFIG_KEY",
    "FINISHED_RUN_CHANGES",
    "RESUMABLE_CHANGES",
    "RunError",
    "StoreConfig",
    "TrainClock",
    "check_devices",
    "check_finished_run",
    "check_precision",
    "config_differences",
    "create_model_for_data",
    "eval_device",
    "load_checkpoint",
    "load_weights",
    "make_trainer",
    "open_run",
    "read_checkpoint",
    "refuse_changed_config",
    "restore_run",
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


def resumed_epoch(ckpt: dict[str, Any]) -> int:
    """The epoch a run resumed from ``ckpt`` trains first: the one after the last epoch it
    finished processing (Lightning's ``epoch_progress``), 0 when the checkpoint has none."""
    progress = ckpt.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {})
    return int(progress.get("current", {}).get("processed", 0))


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
    last = last_checkpoint(run_dir)
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
    error are terminals, otherwise plain lines on standard error
    (:class:`~anchorlearn.engine.progress.ProgressLines`): one per epoch (and one every
    ``t.log_every_n_steps`` steps within epochs of at least ten times as many), or with
    ``t.max_steps`` one per validation and one every ``t.log_every_n_steps`` steps between.
    Quiet or not, a Ctrl-C prints where training stopped and the checkpoint ``--resume``
    continues from (:class:`~anchorlearn.engine.progress.InterruptNotice`). Lightning's
    tips and known noise are silenced while the trainer is built and fitted
    (:class:`~anchorlearn.engine.progress.QuietTrainer`)."""
    # last.ckpt rewritten at the end of every epoch (save_last with save_top_k=0 would only
    # write it when training ends, leaving an interrupted run nothing to resume from); no
    # version counter, so a moved run directory keeps writing last.ckpt, never last-v1.ckpt.
    if t.max_steps is None:
        checkpoint: L.Callback = ModelCheckpoint(
            dirpath=checkpoint_dir(run_dir),
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
        checkpoint = StepCheckpoint(last_checkpoint(run_dir), checkpoint_interval(t))
        batches = t.accumulate_grad_batches
        schedule = {
            "max_steps": t.max_steps,
            "max_epochs": -1,
            "val_check_interval": (t.val_every_n_steps or t.max_steps) * batches,
            "check_val_every_n_epoch": None,
            "use_distributed_sampler": False,
            "enable_checkpointing": False,  # StepCheckpoint writes last.ckpt
        }

    callbacks = [checkpoint, *callbacks, InterruptNotice(last_checkpoint(run_dir))]
    # the bar on a terminal; plain lines anywhere else
    bar = t.progress and not quiet and terminal_attached()
    if bar:
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    elif not quiet:
        every = "epoch" if t.max_steps is None else "validation"
        callbacks.append(ProgressLines(every, log_every_n_steps=t.log_every_n_steps))
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


def open_run(
    run_dir: Path,
    t: TrainerConfig,
    seed: int,
    config: dict[str, Any],
    *,
    resume: bool,
    load: Callable[[Path], dict],
    check_resumable: Callable[[dict, Path], None],
    build: Callable[[], tuple[Any, Any]],
    allow_data_change: bool,
) -> tuple[str | None, Any, Any, dict[str, Any]]:
    """The start of a run, before its trainer: :func:`start_run` (a checkpoint to resume is
    read with ``load(path)``, and ``check_resumable(checkpoint, path)`` refuses one trained
    with other settings), then ``build()`` (the data module and the Lightning module), then,
    when resuming, the data's fingerprint checked against the checkpoint's (a change is
    refused unless ``allow_data_change``). Creates ``run_dir`` and writes ``config.yaml``
    (``config``) and ``data_fingerprint.json`` (on global rank 0).

    Returns the checkpoint to continue from (``None``: a fresh run), the data module, the
    module and the data fingerprint.
    """
    stored: dict[str, Any] = {}

    def check(last: Path) -> None:
        ckpt = load(last)
        check_resumable(ckpt, last)
        stored["fingerprint"] = ckpt.get(DATA_FINGERPRINT_KEY)
        stored["start_epoch"] = resumed_epoch(ckpt)

    ckpt_path = start_run(run_dir, t, seed, resume, check)
    dm, module = build()
    if ckpt_path is not None and hasattr(dm, "start_epoch"):
        dm.start_epoch = stored["start_epoch"]
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
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        write_json(run_dir / DATA_FINGERPRINT_FILE, fingerprint)
    return ckpt_path, dm, module, fingerprint


def restore_run(
    ckpt: dict,
    path: Path,
    build: Callable[[], tuple[Any, nn.Module]],
    *,
    action: str,
    allow_data_change: bool,
) -> tuple[Any, nn.Module]:
    """The data module and the trained module of the checkpoint ``ckpt`` read from
    ``path``: ``build()`` rebuilds them from its config, the data are checked to be those
    the run trained on (:func:`~.rundir.check_data_fingerprint`; ``action`` names what is
    refused, ``allow_data_change`` makes a change a warning) and the weights are loaded
    (:func:`load_weights`)."""
    dm, module = build()
    check_data_fingerprint(
        ckpt.get(DATA_FINGERPRINT_KEY),
        dm.data_fingerprint(),
        checkpoint=path,
        action=action,
        allow=allow_data_change,
    )
    load_weights(module, ckpt["state_dict"], path)
    return dm, module


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


def eval_device(accelerator: str) -> torch.device:
    """The device an evaluation runs on for ``accelerator`` (``auto``: see
    :func:`check_devices`)."""
    resolved = _resolve_accelerator(accelerator)
    if resolved == "gpu":
        if torch.cuda.device_count() == 0:
            raise RunError("--accelerator gpu asked for but no CUDA device is visible")
        return torch.device("cuda")
    if resolved == "mps":
        return torch.device("mps")
    return torch.device("cpu")
