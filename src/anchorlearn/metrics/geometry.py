"""Feature-geometry metrics: neural-collapse NC1, compactness/separability, the angles
between class centres, and the drift of class centres across seeds.

Inputs are features ``(N, D)`` and integer labels ``(N,)``; only the classes that occur in
``labels`` count (``C`` below is their number, at least 2). Everything is computed in
float64 on the features' device; the functions return Python floats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from anchorlearn._checks import check_finite, check_float_tensor, check_labels_tensor

__all__ = [
    "NC1_CENTERS",
    "center_cosines",
    "center_drift",
    "class_centers",
    "compactness_separability",
    "feature_geometry",
    "nc1",
]


def _check_features_labels(
    features: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate; return float64 features ``(N, D)`` and the labels ``(N,)`` remapped to
    ``0..C-1`` over the classes present."""
    check_float_tensor(features, "features")
    labels = check_labels_tensor(labels)
    if features.ndim != 2:
        raise ValueError(f"features must have shape (N, D), got {tuple(features.shape)}")
    if labels.shape != features.shape[:1]:
        raise ValueError(
            f"labels must have shape ({features.shape[0]},) to match features, "
            f"got {tuple(labels.shape)}"
        )
    check_finite(features, "features")
    classes, dense = torch.unique(labels, return_inverse=True)
    if classes.numel() < 2:
        raise ValueError(f"labels must contain at least 2 classes, got {classes.numel()}")
    return features.double(), dense


def class_centers(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Class means ``(C, D)`` (float64) of the classes present, in increasing label order."""
    feats, dense = _check_features_labels(features, labels)
    return _means(feats, dense)


def _means(feats: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    num = int(dense.max()) + 1
    sums = torch.zeros(num, feats.shape[1], dtype=feats.dtype, device=feats.device)
    sums.index_add_(0, dense, feats)
    counts = torch.bincount(dense, minlength=num).to(feats.dtype)
    return sums / counts[:, None]


NC1_CENTERS = ("class_means", "samples")


def _check_center(center: object, name: str) -> str:
    if center not in NC1_CENTERS:
        raise ValueError(f"{name} must be one of {NC1_CENTERS}, got {center!r}")
    return str(center)


def nc1(features: torch.Tensor, labels: torch.Tensor, *, center: str = "class_means") -> float:
    """Within-class variability collapse (Papyan, Han & Donoho 2020):
    ``NC1 = tr(Sigma_W Sigma_B^+) / C``.

    ``Sigma_W`` averages ``(h - mu_c)(h - mu_c)^T`` over all samples; ``Sigma_B`` averages
    ``(mu_c - mu_G)(mu_c - mu_G)^T`` over classes; ``+`` is the Moore-Penrose
    pseudo-inverse. Zero for perfectly collapsed features.

    ``center`` chooses the global mean ``mu_G``:

    - ``"class_means"`` (default): the mean of the ``C`` class means, as in Papyan et al.
      (their classes are balanced, where both choices agree). Every class weighs the same,
      so a dominant class (background pixels, the head of a long-tailed split) does not
      pull ``mu_G`` onto itself.
    - ``"samples"``: the mean of all samples. Under imbalance it sits near the largest
      class, which inflates ``Sigma_B`` along the other classes and under-states NC1
      (the value this function returned before ``center`` existed).
    """
    center = _check_center(center, "center")
    feats, dense = _check_features_labels(features, labels)
    means = _means(feats, dense)
    within = feats - means[dense]
    sigma_w = within.T @ within / feats.shape[0]
    global_mean = means.mean(dim=0) if center == "class_means" else feats.mean(dim=0)
    between = means - global_mean
    sigma_b = between.T @ between / means.shape[0]
    return float(torch.trace(sigma_w @ torch.linalg.pinv(sigma_b, hermitian=True))) / len(means)


def compactness_separability(features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Intra-class spread over inter-class distance.

    ``intra``: for each class the mean Euclidean distance of its samples to the class mean,
    then averaged over classes (class-balanced, so head classes do not dominate);
    ``inter``: mean Euclidean distance over all pairs of class means;
    ``ratio = intra / inter`` (lower is more compact and separated).
    """
    feats, dense = _check_features_labels(features, labels)
    means = _means(feats, dense)
    dist = (feats - means[dense]).norm(dim=1)
    per_class = torch.zeros(len(means), dtype=feats.dtype, device=feats.device)
    per_class.index_add_(0, dense, dist)
    intra = float((per_class / torch.bincount(dense).to(feats.dtype)).mean())
    inter = float(torch.pdist(means).mean())
    return {"intra": intra, "inter": inter, "ratio": intra / inter if inter > 0 else math.inf}


def _centred_cosine_matrix(centers: torch.Tensor) -> torch.Tensor:
    centred = centers.double() - centers.double().mean(dim=0)
    unit = centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return unit @ unit.T


def center_cosines(features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Pairwise cosines between class means centred by their mean (the NC2 view).

    Returns ``min``, ``mean`` and ``max`` over pairs of distinct classes. A simplex ETF
    has every cosine equal to ``-1 / (C - 1)``; ``max`` is the closest pair of classes.
    """
    feats, dense = _check_features_labels(features, labels)
    cos = _centred_cosine_matrix(_means(feats, dense))
    off = cos[~torch.eye(len(cos), dtype=torch.bool, device=cos.device)]
    return {"min": float(off.min()), "mean": float(off.mean()), "max": float(off.max())}


def center_drift(centers_list: Sequence[torch.Tensor]) -> float:
    """Disagreement of class centres learned in different runs (e.g. seeds).

    Each run's centres ``(C, D_r)`` are centred by their mean and turned into the ``C x C``
    matrix of pairwise cosines, which does not change under rotations, reflections or
    scaling of the feature space (different seeds learn differently rotated features, and
    ``D_r`` may even differ). The drift is the mean absolute difference between the
    off-diagonal entries of two runs' matrices, averaged over all pairs of runs: 0 when the
    runs agree up to an orthogonal map and scale, at most 2.
    """
    if isinstance(centers_list, torch.Tensor) or not isinstance(centers_list, Sequence):
        raise TypeError(
            f"centers_list must be a sequence of (C, D) tensors, got {type(centers_list).__name__}"
        )
    if len(centers_list) < 2:
        raise ValueError(f"centers_list must hold at least 2 runs, got {len(centers_list)}")
    matrices = []
    for i, centers in enumerate(centers_list):
        check_float_tensor(centers, f"centers_list[{i}]")
        if centers.ndim != 2 or centers.shape[0] < 2:
            raise ValueError(
                f"centers_list[{i}] must have shape (C, D) with C >= 2, got {tuple(centers.shape)}"
            )
        if centers.shape[0] != centers_list[0].shape[0]:
            raise ValueError(
                f"centers_list[{i}] must have C={centers_list[0].shape[0]} rows like "
                f"centers_list[0], got {centers.shape[0]}"
            )
        check_finite(centers, f"centers_list[{i}]")
        matrices.append(_centred_cosine_matrix(centers).cpu())
    off = ~torch.eye(len(matrices[0]), dtype=torch.bool)
    diffs = [
        (matrices[a] - matrices[b])[off].abs().mean()
        for a in range(len(matrices))
        for b in range(a + 1, len(matrices))
    ]
    return float(torch.stack(diffs).mean())


def feature_geometry(
    features: torch.Tensor, labels: torch.Tensor, *, nc1_center: str = "class_means"
) -> dict[str, float]:
    """All single-run geometry metrics: ``nc1``, ``intra``, ``inter``, ``intra_inter_ratio``,
    ``center_cos_min``, ``center_cos_mean``, ``center_cos_max``. ``nc1_center`` is
    :func:`nc1`'s ``center``."""
    nc1_center = _check_center(nc1_center, "nc1_center")
    spread = compactness_separability(features, labels)
    cosines = center_cosines(features, labels)
    return {
        "nc1": nc1(features, labels, center=nc1_center),
        "intra": spread["intra"],
        "inter": spread["inter"],
        "intra_inter_ratio": spread["ratio"],
        **{f"center_cos_{key}": value for key, value in cosines.items()},
    }
