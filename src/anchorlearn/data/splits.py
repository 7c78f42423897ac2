"""Stratified splits of labelled index sets."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["stratified_split"]


def stratified_split(
    labels: Sequence[int] | np.ndarray, fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into ``(kept, held_out)`` with about ``fraction`` of every class held
    out (``round(fraction * n_c)`` per class, leaving at least one sample of each class in
    ``kept``).

    Returns:
        two sorted int64 index arrays that partition ``range(len(labels))``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if not 0.0 <= float(fraction) < 1.0:
        raise ValueError(f"fraction must lie in [0, 1), got {fraction!r}")
    rng = np.random.default_rng(seed)
    kept, held = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_held = min(round(fraction * len(members)), len(members) - 1)
        held.append(members[:n_held])
        kept.append(members[n_held:])
    empty = np.empty(0, dtype=np.int64)
    return (
        np.sort(np.concatenate([empty, *kept])).astype(np.int64),
        np.sort(np.concatenate([empty, *held])).astype(np.int64),
    )
