"""Long-tailed subsampling of a balanced data set and many/medium/few-shot groups.

Profiles follow Cao et al., "Learning Imbalanced Datasets with Label-Distribution-Aware
Margin Loss" (NeurIPS 2019):

* exponential: ``n_c = floor(n_max * IR^(-c / (C - 1)))`` for class rank ``c = 0..C-1``;
* step: the first ``C // 2`` ranks keep ``n_max``, the others ``floor(n_max / IR)``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "PROFILES",
    "long_tailed_counts",
    "long_tailed_indices",
    "profile_weights",
    "shot_groups",
    "write_class_counts",
]

PROFILES = ("exp", "step")


def _check_profile_args(num_classes: int, imbalance_ratio: float, profile: str) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    if not float(imbalance_ratio) >= 1.0:
        raise ValueError(f"imbalance_ratio must be >= 1, got {imbalance_ratio!r}")
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")


def profile_weights(num_classes: int, imbalance_ratio: float, profile: str = "exp") -> np.ndarray:
    """Relative class frequencies by rank, before flooring: 1 for rank 0 down to ``1/IR``.

    Returns:
        float64 array ``(num_classes,)``.
    """
    _check_profile_args(num_classes, imbalance_ratio, profile)
    ratio = float(imbalance_ratio)
    ranks = np.arange(num_classes, dtype=np.float64)
    if profile == "step":
        return np.where(ranks < num_classes // 2, 1.0, 1.0 / ratio)
    if num_classes == 1:
        return np.ones(1)
    return ratio ** (-ranks / (num_classes - 1))


def long_tailed_counts(
    n_max: int, num_classes: int, imbalance_ratio: float, profile: str = "exp"
) -> list[int]:
    """Per-rank sample counts of a long-tailed profile.

    Args:
        n_max: count of the most frequent class (rank 0).
        num_classes: ``C``.
        imbalance_ratio: ``IR = n_max / n_min`` (>= 1).
        profile: ``"exp"`` or ``"step"`` (module docstring).

    Returns:
        ``C`` counts, non-increasing, the first equal to ``n_max``.
    """
    if isinstance(n_max, bool) or not isinstance(n_max, int) or n_max < 1:
        raise ValueError(f"n_max must be an int >= 1, got {n_max!r}")
    weights = profile_weights(num_classes, imbalance_ratio, profile)
    # The small tolerance keeps exact products such as 6000 * 100^-1 = 60 from flooring to 59.
    return [max(1, math.floor(n_max * w + 1e-9)) for w in weights]


def long_tailed_indices(
    labels: Sequence[int] | np.ndarray,
    imbalance_ratio: float,
    profile: str = "exp",
    seed: int = 0,
) -> np.ndarray:
    """Indices of a long-tailed subset of a labelled set.

    The classes present in ``labels`` are ranked in an order drawn from ``seed`` (so the
    head and tail classes depend on the seed), the rank-``c`` class keeps
    ``long_tailed_counts(n_max, C, IR, profile)[c]`` samples with ``n_max`` the smallest
    class count of ``labels``, and the seed also picks *which* samples are kept.
    ``imbalance_ratio == 1`` keeps every index.

    Returns:
        sorted int64 indices into ``labels``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(
            f"labels must be a 1-D integer array, got {labels.dtype} of shape {labels.shape}"
        )
    if float(imbalance_ratio) == 1.0:
        return np.arange(len(labels), dtype=np.int64)
    classes, class_counts = np.unique(labels, return_counts=True)
    if len(classes) == 0:
        raise ValueError("labels must not be empty")
    rng = np.random.default_rng(seed)
    order = rng.permutation(classes)
    counts = long_tailed_counts(int(class_counts.min()), len(classes), imbalance_ratio, profile)
    keep = []
    for cls, count in zip(order, counts, strict=True):
        members = np.flatnonzero(labels == cls)
        keep.append(rng.permutation(members)[:count])
    return np.sort(np.concatenate(keep)).astype(np.int64)


def _as_count_mapping(train_counts: Mapping[int, int] | Sequence[int]) -> dict[int, int]:
    if isinstance(train_counts, Mapping):
        return {int(k): int(v) for k, v in train_counts.items()}
    return {c: int(v) for c, v in enumerate(train_counts)}


def shot_groups(
    train_counts: Mapping[int, int] | Sequence[int] | np.ndarray,
    many_thresh: int | None = None,
    few_thresh: int | None = None,
) -> dict[int, str]:
    """Assign each class to ``"many"``, ``"medium"`` or ``"few"`` by its training count.

    Args:
        train_counts: count per class, a mapping class -> count or a sequence indexed by
            class.
        many_thresh: with ``few_thresh``, absolute thresholds: ``count > many_thresh`` is
            many-shot, ``count < few_thresh`` few-shot, the rest medium (the usual choice
            for large data sets is 100 / 20).
        few_thresh: see ``many_thresh``.

    When both thresholds are ``None`` the classes sorted by count (descending, ties by
    class index) are split into top / middle / bottom thirds (sizes as even as possible,
    extra classes going to the higher groups; 10 classes -> 4 / 3 / 3).
    """
    counts = _as_count_mapping(train_counts)
    if not counts:
        raise ValueError("train_counts must not be empty")
    if (many_thresh is None) != (few_thresh is None):
        raise ValueError(
            "many_thresh and few_thresh must be given together or not at all, "
            f"got many_thresh={many_thresh!r}, few_thresh={few_thresh!r}"
        )
    if many_thresh is not None and few_thresh is not None:
        if few_thresh > many_thresh + 1:
            raise ValueError(
                f"few_thresh must be <= many_thresh + 1, got few_thresh={few_thresh}, "
                f"many_thresh={many_thresh}"
            )
        return {
            c: "many" if n > many_thresh else "few" if n < few_thresh else "medium"
            for c, n in counts.items()
        }
    ordered = sorted(counts, key=lambda c: (-counts[c], c))
    groups = np.array_split(np.arange(len(ordered)), 3)
    result = {}
    for name, positions in zip(("many", "medium", "few"), groups, strict=True):
        for pos in positions:
            result[ordered[int(pos)]] = name
    return dict(sorted(result.items()))


def write_class_counts(
    path: str | os.PathLike[str],
    counts: Mapping[int, int] | Sequence[int] | np.ndarray,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Write per-class counts to JSON: ``{"counts": {"0": n, ...}, "total": N,
    "class_names": [...]}`` (``class_names`` only when given). Returns the path."""
    mapping = _as_count_mapping(counts)
    if class_names is not None and len(class_names) < len(mapping):
        raise ValueError(
            f"class_names must name every class: expected at least {len(mapping)} names, "
            f"got {len(class_names)}"
        )
    payload: dict[str, object] = {
        "counts": {str(c): n for c, n in sorted(mapping.items())},
        "total": sum(mapping.values()),
    }
    if class_names is not None:
        payload["class_names"] = list(class_names)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
