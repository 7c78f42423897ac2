"""What a training run prints while it trains.

On a terminal (standard output and standard error both terminals) Lightning's progress bar
is kept. Anywhere else (output piped or written to a file), or with
``trainer.progress: false``, :class:`ProgressLines` writes plain lines to standard error:
one per training epoch, or for an iteration-based run (``trainer.max_steps``) one per
validation and one every ``trainer.log_every_n_steps`` optimiser steps between them::

    step=400/16000 train/loss=3.08 train/ce/ce=2.61 lr=0.0098 sar_gate=shut time=2m07s eta=1h23m
    epoch=2/10 step=16 train/loss=3.08 train/acc=0.414 lr=0.05 val/acc=0.411 time=3.2s eta=13s

``key=value`` fields separated by spaces: the epoch (counted from 1, of the total) and the
optimiser steps done, or the step of ``max_steps``; the training values, each the running
mean since the previous line of what the module logs at every step, weighted by the batch
size (all of a line's values are that same kind of mean); ``lr``, the learning rate of the
last step (of the optimiser's last parameter group: the head's when the backbone has its
own); the validation metrics (lines after a validation or at an epoch's end); for every SAR
term whether its gate is ``shut`` or opened (``open@N``: at the term's step ``N``); the
time since training started and ``eta``, an estimate of the time left at the mean pace so
far (validation included; absent on the last line). An epoch of at least
:data:`LONG_EPOCH` x ``log_every_n_steps`` steps also gets a line every
``log_every_n_steps`` steps within it, with a ``batch=b/B`` field and without validation
metrics; shorter epochs get their end-of-epoch line only. No carriage returns, no escape
codes. A quiet run prints neither bar nor lines.

:class:`InterruptNotice` prints one line when training is stopped by Ctrl-C: where it
stopped and which checkpoint ``--resume`` continues from.

:class:`QuietTrainer` silences, for its own construction and ``fit`` only (nothing is
changed at import), Lightning's informational lines (tips, the ``GPU available`` /
``TPU available`` banner, "Trainer.fit stopped", "Detected KeyboardInterrupt") and the
warnings in :data:`LIGHTNING_NOISE`; Lightning's own warnings and errors still show.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, TextIO

import lightning as L
import torch

from .evaluate import regularizer_state

__all__ = [
    "LIGHTNING_NOISE",
    "LONG_EPOCH",
    "InterruptNotice",
    "ProgressLines",
    "QuietTrainer",
    "format_seconds",
    "quiet_lightning",
    "terminal_attached",
]

# Warnings of Lightning (and of torch, through Lightning) that say nothing about a run of
# this package: regular expressions matched against the start of the message.
LIGHTNING_NOISE = (
    r".*does not have many workers",
    r"Consider setting `persistent_workers=True`",
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    r"You passed in a `val_dataloader` but have no `validation_step`",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",
    r"The `srun` command is available on your system but is not used",
    r"Checkpoint directory .* exists and is not empty",
    # torch's DDP: broadcast_buffers=False is what make_trainer means (see the comment there)
    r"`broadcast_buffers` is deprecated",
    r"torch\.distributed\.nn\.functional\.all_gather is deprecated",
)

_LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Within the block, Lightning logs warnings and errors only (no tips, banners or other
    information lines) and the warnings of :data:`LIGHTNING_NOISE` are ignored; logger
    levels and warning filters are restored on leaving it."""
    loggers = [logging.getLogger(name) for name in _LIGHTNING_LOGGERS]
    levels = [log.level for log in loggers]
    with warnings.catch_warnings():
        for pattern in LIGHTNING_NOISE:
            warnings.filterwarnings("ignore", message=pattern)
        for log in loggers:
            if log.getEffectiveLevel() < logging.WARNING:
                log.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for log, level in zip(loggers, levels, strict=True):
                log.setLevel(level)


class QuietTrainer(L.Trainer):
    """A Lightning trainer built and fitted inside :func:`quiet_lightning`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with quiet_lightning():
            super().__init__(*args, **kwargs)

    def fit(self, *args: Any, **kwargs: Any) -> None:
        with quiet_lightning():
            super().fit(*args, **kwargs)


def terminal_attached() -> bool:
    """Whether standard output (where the progress bar draws) and standard error are both
    terminals."""
    return all(
        stream is not None and getattr(stream, "isatty", lambda: False)()
        for stream in (sys.stdout, sys.stderr)
    )


def format_seconds(seconds: float) -> str:
    """``4.2s`` under a minute, ``3m07s`` under an hour, ``2h03m07s`` beyond."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _number(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


# epoch-based runs print lines within an epoch only when it has at least this many times
# ``log_every_n_steps`` optimiser steps (shorter epochs: the line at their end is enough)
LONG_EPOCH = 10


def _batch_size(batch: Any) -> int:
    """The length of the first tensor in ``batch`` (a tensor, or sequences and mappings of
    them), 1 when it holds none."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            if isinstance(item, (torch.Tensor, list, tuple, dict)):
                return _batch_size(item)
    return 1


class ProgressLines(L.Callback):
    """Plain progress lines written by global rank 0 to ``stream`` (default: standard error
    at the time of writing). The fields are described in :mod:`anchorlearn.engine.progress`.

    ``every="epoch"``: a line at the end of every training epoch; within an epoch of at
    least :data:`LONG_EPOCH` x ``log_every_n_steps`` optimiser steps, also a line every
    ``log_every_n_steps`` steps (``batch=b/B`` among its fields, no validation metrics).
    ``every="validation"`` (an iteration-based run): a line after every validation, one
    every ``log_every_n_steps`` optimiser steps between them, and a last one for the
    steps after the last validation. ``log_every_n_steps=None``: no lines between.

    The training values of a line are the running means since the previous line of the
    values the module logs at every step, weighted by the batch size (the length of the
    batch's first tensor), so a line's values are all the same kind of mean: over the
    images seen since the previous line, and over all the processes of a distributed run.
    Every rank computes them at the same points (a line's means are summed over the ranks
    in one reduction, which all of them join); only rank 0 prints.
    """

    def __init__(
        self,
        every: Literal["epoch", "validation"] = "epoch",
        stream: TextIO | None = None,
        log_every_n_steps: int | None = None,
    ) -> None:
        if every not in ("epoch", "validation"):
            raise ValueError(f"every must be 'epoch' or 'validation', got {every!r}")
        if log_every_n_steps is not None and (
            isinstance(log_every_n_steps, bool)
            or not isinstance(log_every_n_steps, int)
            or log_every_n_steps < 1
        ):
            raise ValueError(
                f"log_every_n_steps must be a positive int or None, got {log_every_n_steps!r}"
            )
        self.every = every
        self.stream = stream
        self.log_every_n_steps = log_every_n_steps
        self._start = time.perf_counter()
        self._start_step = 0
        self._total: float | None = None
        self._within = False
        self._sums: dict[str, torch.Tensor] = {}
        self._weights: dict[str, int] = {}
        self._seen: dict[str, torch.Tensor] = {}
        self._val: dict[str, float] = {}
        self._lr: float | None = None
        self._last_step = -1
        self._prev_step = -1
        # a line due within an epoch or between validations: (time, batch number)
        self._due: tuple[float, int] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()
        self._reset()
        self._seen, self._due, self._lr = {}, None, None
        self._start_step = self._last_step = self._prev_step = trainer.global_step
        self._total = _total_steps(trainer)
        n = self.log_every_n_steps
        if n is None:
            self._within = False
        elif self.every == "validation":
            self._within = True
        else:
            batches = trainer.num_training_batches  # inf for an iterable without a length
            per_epoch = batches / max(trainer.accumulate_grad_batches, 1)
            self._within = per_epoch == math.inf or math.ceil(per_epoch) >= LONG_EPOCH * n

    def _reset(self) -> None:
        self._sums, self._weights, self._val = {}, {}, {}

    def _reset_train(self) -> None:
        self._sums, self._weights = {}, {}

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # the rate this step uses: the last group's (the head's when the backbone has its own)
        self._lr = float(optimizer.param_groups[-1]["lr"])

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._due is not None:
            self._write(trainer, pl_module, "within")

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # the values this step logged, times the batch size; summed on their device and
        # read once per line (no synchronisation per step)
        size = _batch_size(batch)
        metrics = trainer.callback_metrics
        for key, value in metrics.items():
            if not key.startswith("train/") or not isinstance(value, torch.Tensor):
                continue
            if key.endswith("_epoch") or (
                key.endswith("_step") and key.removesuffix("_step") in metrics
            ):
                continue  # an epoch aggregate, or the per-step copy of a value
            if self._seen.get(key) is value:
                continue  # not logged again since the previous batch
            self._seen[key] = value
            total = value.detach().float().mean() * size
            self._sums[key] = total if key not in self._sums else self._sums[key] + total
            self._weights[key] = self._weights.get(key, 0) + size
        step = trainer.global_step
        if step == self._prev_step:
            return  # accumulating gradients: no optimiser step
        self._prev_step = step
        n = self.log_every_n_steps
        last_batch = self.every == "epoch" and batch_idx + 1 >= trainer.num_training_batches
        if self._within and n and step % n == 0 and step > self._last_step and not last_batch:
            # written at the next batch or validation, unless a validation line replaces it
            self._due = (time.perf_counter(), batch_idx + 1)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self._due is None:
            return
        if self.every == "validation":
            self._due = None  # the line after the validation covers this step
        else:
            self._write(trainer, pl_module, "within")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._val = {
            key: float(value)
            for key, value in trainer.callback_metrics.items()
            if key.startswith("val/")
        }
        if self.every == "validation":
            self._write(trainer, pl_module, "validation")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every == "epoch":
            self._due = None
            self._write(trainer, pl_module, "epoch")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._due = None
        if self.every == "validation" and trainer.global_step > self._last_step:
            self._write(trainer, pl_module, "validation")

    def _means(self, trainer: L.Trainer) -> dict[str, float]:
        """The batch-weighted means of the training values since the previous line, over
        all the ranks (every rank must call this at the same point)."""
        keys = list(self._sums)  # in the order logged, the same on every rank
        if not keys:
            return {}
        sums = torch.stack([self._sums[key] for key in keys])
        weights = torch.tensor([float(self._weights[key]) for key in keys], device=sums.device)
        both = torch.cat([sums, weights])
        if trainer.world_size > 1:
            both = trainer.strategy.reduce(both, reduce_op="sum")
        values = both.cpu().tolist()
        return {key: values[i] / values[len(keys) + i] for i, key in enumerate(keys)}

    def _write(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        kind: Literal["within", "validation", "epoch"],
    ) -> None:
        now, batch = time.perf_counter(), None
        if kind == "within" and self._due is not None:
            now, batch = self._due  # when the line fell due, after which batch of the epoch
        fields = []
        step = trainer.global_step
        if self.every == "epoch":
            fields.append(f"epoch={trainer.current_epoch + 1}/{trainer.max_epochs}")
            if batch is not None:
                fields.append(f"batch={batch}/{trainer.num_training_batches}")
            fields.append(f"step={step}")
        else:
            fields.append(f"step={step}/{trainer.max_steps}")
        fields.extend(f"{key}={_number(value)}" for key, value in self._means(trainer).items())
        if self._lr is not None:
            fields.append(f"lr={self._lr:.4g}")
        if kind != "within":
            fields.extend(f"{key}={_number(value)}" for key, value in self._val.items())
            self._val = {}
        if hasattr(pl_module, "objective"):
            state = regularizer_state(pl_module)
            for key, opened in state.items():
                if key.endswith("_gate_open_step"):
                    name = key.removesuffix("_gate_open_step")
                    token = "shut" if opened < 0 else f"open@{opened}"
                    if f"{name}_classes_open" in state:  # a per-class gate: how many opened
                        total = getattr(pl_module, "num_classes", "?")
                        token += f"({state[f'{name}_classes_open']}/{total})"
                    fields.append(f"{name}_gate={token}")
        elapsed = now - self._start
        fields.append(f"time={format_seconds(elapsed)}")
        done = step - self._start_step
        if self._total is not None and self._total > step and done > 0:
            fields.append(f"eta={format_seconds(elapsed / done * (self._total - step))}")
        if trainer.is_global_zero:
            print(" ".join(fields), file=self.stream or sys.stderr, flush=True)
        self._reset_train()
        self._due = None
        self._last_step = step


def _total_steps(trainer: L.Trainer) -> float | None:
    """The optimiser steps the whole run takes (``None`` when unknown or unbounded)."""
    try:
        total = float(trainer.estimated_stepping_batches)
    except Exception:  # an estimate only: the lines go without an ETA
        return None
    return total if math.isfinite(total) and total > 0 else None


class InterruptNotice(L.Callback):
    """On Ctrl-C (a ``KeyboardInterrupt`` during training), global rank 0 writes one line
    to ``stream`` (default: standard error): where training stopped and what ``--resume``
    continues from, e.g.::

        interrupted at epoch 2/10, step 37; the last checkpoint is run/checkpoints/last.ckpt
        (step 32): continue with --resume

    (one line), ``interrupted at step S/N`` for an iteration-based run, and
    ``no checkpoint yet (... does not exist): --resume starts afresh`` before the first
    checkpoint. The step of ``checkpoint`` is read from the file (memory-mapped, so large
    checkpoints are not read whole). Lightning's own message is silenced by
    :func:`quiet_lightning`; other exceptions show their traceback as usual.
    """

    def __init__(self, checkpoint: str | Path, stream: TextIO | None = None) -> None:
        self.checkpoint = Path(checkpoint)
        self.stream = stream

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, KeyboardInterrupt) or not trainer.is_global_zero:
            return
        print(self.message(trainer), file=self.stream or sys.stderr, flush=True)

    def message(self, trainer: L.Trainer) -> str:
        """The line :meth:`on_exception` writes for ``trainer``'s current state."""
        step = trainer.global_step
        if trainer.max_epochs in (None, -1) and trainer.max_steps > 0:
            where = f"interrupted at step {step}/{trainer.max_steps}"
        else:
            where = f"interrupted at epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"
            where += f", step {step}"
        path = self.checkpoint
        if not path.exists():
            return f"{where}; no checkpoint yet ({path} does not exist): --resume starts afresh"
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            saved_step = int(saved["global_step"])
        except Exception as err:  # reported, not raised, while shutting down
            return (
                f"{where}; the last checkpoint {path} cannot be read "
                f"({type(err).__name__}: {err}): it may be incomplete"
            )
        return f"{where}; the last checkpoint is {path} (step {saved_step}): continue with --resume"
