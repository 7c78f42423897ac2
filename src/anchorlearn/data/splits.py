"""Stratified splits of labelled index sets."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["labelled_split", "stratified_split"]


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
    return _sorted_indices(kept), _sorted_indices(held)


def _sorted_indices(parts: list[np.ndarray]) -> np.ndarray:
    """The per-class index arrays ``parts`` as one sorted int64 array (empty when none)."""
    return np.sort(np.concatenate([np.empty(0, dtype=np.int64), *parts])).astype(np.int64)


def labelled_split(
    labels: Sequence[int] | np.ndarray,
    fraction: float,
    seed: int = 0,
    *,
    name: str = "fraction",
    class_names: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into ``(labelled, unlabelled)`` for semi-supervised training:
    ``round(fraction * n_c)`` of every class ``c`` labelled, drawn at random.

    The draw has its own random stream, ``np.random.default_rng((seed, 1))``, so it does
    not repeat the permutations of :func:`stratified_split` with the same ``seed``.

    Args:
        labels: 1-D class labels.
        fraction: in ``(0, 1]``; 1 labels everything.
        seed: seed of the draw.
        name: what ``fraction`` is called in error messages (a config key, say).
        class_names: names of the classes (indexed by label) for error messages.

    Raises:
        ValueError: ``fraction`` outside ``(0, 1]``, or so small that a class would get no
            labelled image (the message names the classes and the smallest fraction that
            labels one image of each).

    Returns:
        two sorted int64 index arrays that partition ``range(len(labels))``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if isinstance(fraction, bool) or not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"{name} must lie in (0, 1], got {fraction!r}")
    classes, counts = np.unique(labels, return_counts=True)
    take = np.array([round(float(fraction) * int(n)) for n in counts], dtype=np.int64)
    if (take == 0).any():
        empty = [
            f"{class_names[c] if class_names is not None else c} ({n} images)"
            for c, n, t in zip(classes.tolist(), counts.tolist(), take.tolist(), strict=True)
            if t == 0
        ]
        smallest = int(counts.min())
        raise ValueError(
            f"{name}={fraction} leaves {len(empty)} class(es) without a labelled image "
            f"(round({fraction} * images of the class) = 0): {', '.join(empty[:10])}"
            f"{' and more' if len(empty) > 10 else ''}; every class needs at least one: "
            f"raise {name} above {0.5 / smallest:.3g} (the smallest class has "
            f"{smallest} images)"
        )
    rng = np.random.default_rng((int(seed), 1))
    labelled, unlabelled = [], []
    for cls, n in zip(classes, take, strict=True):
        members = rng.permutation(np.flatnonzero(labels == cls))
        labelled.append(members[:n])
        unlabelled.append(members[n:])
    return _sorted_indices(labelled), _sorted_indices(unlabelled)
