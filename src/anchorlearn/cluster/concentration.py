"""Per-cluster concentration (temperature) estimation of Prototypical Contrastive Learning."""

from __future__ import annotations

import torch

from anchorlearn._checks import check_labels_tensor, check_matrix, check_positive

__all__ = ["estimate_concentration"]


def estimate_concentration(
    x: torch.Tensor,
    centroids: torch.Tensor,
    assignments: torch.Tensor,
    temperature: float = 0.2,
    eps: float = 10.0,
    percentiles: tuple[float, float] = (10.0, 90.0),
) -> torch.Tensor:
    r"""Concentration :math:`\phi_c` of every cluster (Li et al., PCL, ICLR 2021, Eq. 12).

    For a cluster :math:`c` with :math:`n_c \ge 2` members :math:`v`:

    .. math:: \phi_c = \frac{\frac{1}{n_c}\sum_{v \in c} \lVert v - c\rVert_2}{\log(n_c + \epsilon)}

    Then, in order:

    1. clusters with one member (singletons) and clusters with none (empty) get the largest
       :math:`\phi` of the clusters with two or more members (they are treated as the least
       concentrated); if no cluster has two members, every :math:`\phi` is ``temperature``;
    2. :math:`\phi` is clipped to its ``percentiles`` (10th and 90th by default, linear
       interpolation, taken over all ``k`` clusters after step 1);
    3. non-positive values (every member on its centroid) are raised to the smallest
       positive one, so that no logit is divided by zero;
    4. :math:`\phi` is rescaled so that its mean equals ``temperature``.

    The distances are measured to ``centroids`` as given. PCL measures them to the k-means
    centroids before normalisation, i.e. ``ClusterResult.raw_centroids`` of
    :func:`~anchorlearn.cluster.kmeans`, not its normalised ``centroids``: for unit-norm
    members around a mean of norm :math:`r` the mean squared distance is :math:`1 - r^2` to
    the mean and :math:`2 - 2r` to its normalisation, a ratio :math:`2 / (1 + r)` that
    differs from cluster to cluster, so the choice is not undone by the final rescaling.

    Args:
        x: ``(N, D)`` embeddings.
        centroids: ``(k, D)``.
        assignments: ``(N,)`` integer in ``[0, k)``.
        temperature: target mean :math:`> 0` (PCL: 0.2, the InfoNCE temperature).
        eps: :math:`\epsilon > 0` smoothing the count (PCL: 10).
        percentiles: ``(low, high)`` with ``0 <= low <= high <= 100``.

    Returns:
        ``(k,)`` strictly positive concentrations in the dtype and device of ``x`` (computed
        in float32 for float16 and bfloat16 input).
    """
    x = check_matrix(x, "x")
    centroids = check_matrix(centroids, "centroids", cols=x.shape[1])
    assignments = check_labels_tensor(assignments, "assignments")
    k = centroids.shape[0]
    if k == 0:
        raise ValueError("centroids must hold at least one row, got shape (0, D)")
    if assignments.shape != (x.shape[0],):
        raise ValueError(
            f"assignments must have shape ({x.shape[0]},) to match x, "
            f"got {tuple(assignments.shape)}"
        )
    if assignments.numel() and (int(assignments.min()) < 0 or int(assignments.max()) >= k):
        raise ValueError(
            f"assignments must lie in [0, {k}), got values in "
            f"[{int(assignments.min())}, {int(assignments.max())}]"
        )
    temperature = check_positive(temperature, "temperature")
    eps = check_positive(eps, "eps")
    low, high = (float(p) for p in percentiles)
    if not 0.0 <= low <= high <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low <= high <= 100, got {percentiles}")

    out_dtype = x.dtype
    # torch.quantile takes float32 and float64 only
    x = x.detach().float() if x.dtype in (torch.float16, torch.bfloat16) else x.detach()
    phi = _concentration(x, centroids, assignments, k, temperature, eps, low, high)
    return phi.to(out_dtype)


def _concentration(
    x: torch.Tensor,
    centroids: torch.Tensor,
    assignments: torch.Tensor,
    k: int,
    temperature: float,
    eps: float,
    low: float,
    high: float,
) -> torch.Tensor:
    """:func:`estimate_concentration` on validated float32 or float64 input."""
    labels = assignments.long().to(x.device)
    dist = (x - centroids.detach().to(x)[labels]).norm(dim=1)
    counts = torch.bincount(labels, minlength=k).to(x.dtype)
    dist_sums = x.new_zeros(k).index_add_(0, labels, dist)
    populous = counts >= 2
    if not bool(populous.any()):
        return x.new_full((k,), temperature)
    phi = dist_sums / counts.clamp_min(1.0) / torch.log(counts + eps)
    phi = torch.where(populous, phi, phi[populous].max())
    bounds = torch.quantile(phi, phi.new_tensor([low / 100.0, high / 100.0]))
    phi = phi.clamp(float(bounds[0]), float(bounds[1]))
    positive = phi > 0
    if not bool(positive.any()):
        return x.new_full((k,), temperature)
    phi = torch.where(positive, phi, phi[positive].min())
    return phi * (temperature / phi.mean())
