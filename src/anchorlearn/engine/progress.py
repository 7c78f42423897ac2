"""What a training run prints while it trains.

On a terminal (standard output and standard error both terminals) Lightning's progress bar
is kept. Anywhere else (output piped or written to a file), or with
``trainer.progress: false``, :class:`ProgressLines` writes one plain line to standard error
per training epoch, or per validation of an iteration-based run (``trainer.max_steps``)::

    epoch=2/10 step=16 train/loss=3.08 train/acc=0.414 val/acc=0.411 sar_gate=open@12 time=3.2s

``key=value`` fields separated by spaces: the epoch (counted from 1, of the total) or the
step (of ``max_steps``), the optimiser steps done, the training values (Lightning's epoch
means where the module logs them per epoch, otherwise the mean over the steps since the
previous line), the validation metrics, for every SAR term whether its gate is ``shut`` or
opened (``open@N``: at the term's step ``N``), and the time since training started. No
carriage returns, no escape codes. A quiet run prints neither bar nor lines.

:class:`QuietTrainer` silences, for its own construction and ``fit`` only (nothing is
changed at import), Lightning's informational lines (tips, the ``GPU available`` /
``TPU available`` banner, "Trainer.fit stopped") and the warnings in :data:`LIGHTNING_NOISE`;
Lightning's own warnings and errors still show.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any, Literal, TextIO

import lightning as L
import torch

from .evaluate import regularizer_state

__all__ = [
    "LIGHTNING_NOISE",
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


class ProgressLines(L.Callback):
    """One plain line per training epoch (``every="epoch"``) or per validation of an
    iteration-based run (``every="validation"``, plus a last line for the steps after the
    last validation), written by global rank 0 to ``stream`` (default: standard error at
    the time of writing). The fields are described in :mod:`anchorlearn.engine.progress`.

    Every rank reads the logged values at the same points: reading an epoch-level value
    logged with ``sync_dist`` may reduce it over the ranks, which all of them must join.
    """

    def __init__(
        self, every: Literal["epoch", "validation"] = "epoch", stream: TextIO | None = None
    ) -> None:
        if every not in ("epoch", "validation"):
            raise ValueError(f"every must be 'epoch' or 'validation', got {every!r}")
        self.every = every
        self.stream = stream
        self._start = time.perf_counter()
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._val: dict[str, float] = {}
        self._last_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()
        self._reset()
        self._last_step = trainer.global_step

    def _reset(self) -> None:
        self._sums, self._counts, self._val = {}, {}, {}

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # values of this step; summed on their device, read once per line (no sync per step)
        for key, value in trainer.callback_metrics.items():
            if not key.startswith("train/") or key.endswith("_epoch"):
                continue
            key = key.removesuffix("_step")
            total = value.detach().float()
            self._sums[key] = total if key not in self._sums else self._sums[key] + total
            self._counts[key] = self._counts.get(key, 0) + 1

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._val = {
            key: float(value)
            for key, value in trainer.callback_metrics.items()
            if key.startswith("val/")
        }
        if self.every == "validation":
            self._write(trainer, pl_module, epoch_end=False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every == "epoch":
            self._write(trainer, pl_module, epoch_end=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every == "validation" and trainer.global_step > self._last_step:
            self._write(trainer, pl_module, epoch_end=False)

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch_end: bool) -> None:
        fields = []
        if self.every == "epoch":
            fields.append(f"epoch={trainer.current_epoch + 1}/{trainer.max_epochs}")
            fields.append(f"step={trainer.global_step}")
        else:
            fields.append(f"step={trainer.global_step}/{trainer.max_steps}")
        train = {key: total / self._counts[key] for key, total in self._sums.items()}
        if epoch_end:  # Lightning's epoch means (weighted by batch size) where logged
            for key, value in trainer.callback_metrics.items():
                if key.startswith("train/") and key.endswith("_epoch"):
                    train[key.removesuffix("_epoch")] = value
        fields.extend(f"{key}={_number(float(value))}" for key, value in train.items())
        fields.extend(f"{key}={_number(value)}" for key, value in self._val.items())
        if hasattr(pl_module, "objective"):
            state = regularizer_state(pl_module)
            for key, step in state.items():
                if key.endswith("_gate_open_step"):
                    name = key.removesuffix("_gate_open_step")
                    fields.append(f"{name}_gate={'shut' if step < 0 else f'open@{step}'}")
        fields.append(f"time={format_seconds(time.perf_counter() - self._start)}")
        if trainer.is_global_zero:
            print(" ".join(fields), file=self.stream or sys.stderr, flush=True)
        self._reset()
        self._last_step = trainer.global_step
