"""Tiny data and configs for engine tests: a few seconds per run on a CPU.

Import with ``from tests.engine.runfixtures import ...`` (run pytest from the repository
root).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np

__all__ = ["COUNTS", "StopAfter", "digits_config", "npz_config", "write_npz"]


class StopAfter(L.Callback):
    """Ends training cleanly after ``epochs`` epochs, as an interruption would."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


# images per class: class 2 has two images, too few to reach the 20 % test split, so the
# test split holds no image of the one "few" class and its accuracy is undefined (NaN)
COUNTS = (40, 30, 2)


def write_npz(path: Path, *, order: np.ndarray | None = None) -> Path:
    """An ``.npz`` of 8x8 grey images of :data:`COUNTS` classes (class ``c`` is brighter in
    row ``c``); ``order`` re-saves the same rows in another order."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(len(COUNTS)), COUNTS)
    images = rng.integers(0, 100, size=(len(labels), 8, 8)).astype(np.uint8)
    images[np.arange(len(labels)), labels] += 150
    if order is not None:
        images, labels = images[order], labels[order]
    np.savez(path, images=images, labels=labels)
    return path


def npz_config(path: Path, **trainer) -> dict:
    """A one-epoch classification config on the ``.npz`` at ``path``."""
    return {
        "name": "npz",
        "task": "classification",
        "data": {"source": f"npz:{path}", "batch_size": 16, "augment": False},
        "model": {"name": "small_cnn", "kwargs": {"width": 4, "feat_dim": 8}},
        "losses": ["ce"],
        "optim": {"lr": 0.05, "schedule": "constant"},
        "trainer": {"max_epochs": 1, "progress": False, **trainer},
    }


def digits_config(**changes) -> dict:
    """A two-epoch long-tailed (IR 10) classification config on scikit-learn digits, CE
    plus SAR; ``section=value`` replaces a section, ``section__key=value`` one key of it."""
    raw = {
        "name": "digits",
        "task": "classification",
        "data": {"source": "digits", "imbalance_ratio": 10, "batch_size": 64},
        "model": {"name": "small_cnn", "kwargs": {"width": 8, "feat_dim": 16}},
        "losses": ["ce", {"name": "sar", "update_conf": 0.5}],
        "optim": {"lr": 0.05},
        "trainer": {"max_epochs": 2, "progress": False},
    }
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            raw[section][field] = value
        else:
            raw[section] = value
    return raw
