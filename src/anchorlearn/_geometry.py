"""Fixed point configurations shared across anchorlearn (models, losses): a simplex
equiangular tight frame and points spread on the unit hypersphere by a Riesz energy.

Like the other shared helpers, this module imports nothing else of the project, so any
building block may use it; its few argument checks are written out here for that reason.
"""

from __future__ import annotations

import math

import torch

__all__ = ["RIESZ_STEPS", "RIESZ_STEP_SIZE", "riesz_uniform_points", "seed_or_draw", "simplex_etf"]

# The projected gradient descent of :func:`riesz_uniform_points`: its default number of
# steps, the step size (scaled by 1 / (C - 1), so the step follows the mean pairwise force)
# and the largest move of a point in one step, as a fraction of its nearest-neighbour distance.
RIESZ_STEPS = 500
RIESZ_STEP_SIZE = 2.0
_RIESZ_MAX_MOVE = 0.1


def _check_int(value: object, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def seed_or_draw(seed: int | None) -> int:
    """``seed``, or (``None``) a seed drawn from torch's global generator, so that seeding
    torch reproduces fixed points drawn with it as it does any other random initialisation."""
    return int(torch.randint(2**31, ())) if seed is None else seed


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    return seed


def simplex_etf(feat_dim: int, num_classes: int, *, seed: int = 0) -> torch.Tensor:
    r"""Simplex ETF ``M`` of shape ``(D, C)`` (float64), one unit-norm column per class.

    .. math::
        M = \sqrt{\tfrac{C}{C-1}}\; U \left(I_C - \tfrac{1}{C} \mathbf{1}\mathbf{1}^\top\right),

    with :math:`U \in \mathbb{R}^{D \times C}` a random partial orthogonal matrix
    (:math:`U^\top U = I_C`), the Q factor of a QR decomposition of a Gaussian matrix drawn
    from a generator seeded with ``seed``. Every column has unit norm and any two columns have
    cosine exactly :math:`-1/(C-1)`. The construction needs ``D >= C``.
    """
    num_classes = _check_int(num_classes, "num_classes", 2)
    feat_dim = _check_int(feat_dim, "feat_dim", 1)
    if feat_dim < num_classes:
        raise ValueError(
            f"feat_dim must be >= num_classes for a simplex ETF built from a D x C partial "
            f"orthogonal matrix, got feat_dim={feat_dim} < num_classes={num_classes}"
        )
    generator = torch.Generator().manual_seed(_check_seed(seed))
    gaussian = torch.randn(feat_dim, num_classes, generator=generator, dtype=torch.float64)
    orthonormal, _ = torch.linalg.qr(gaussian, mode="reduced")
    centering = torch.eye(num_classes, dtype=torch.float64) - 1.0 / num_classes
    return math.sqrt(num_classes / (num_classes - 1)) * orthonormal @ centering


def riesz_uniform_points(
    num_points: int, dim: int, *, seed: int, steps: int = RIESZ_STEPS
) -> torch.Tensor:
    r"""``C = num_points`` unit vectors in :math:`\mathbb{R}^D` spread over the sphere:
    ``(C, D)`` float64, one point per row.

    They approximately minimise the Riesz 1-energy
    :math:`E = \sum_{i<j} 1 / \lVert x_i - x_j \rVert` on the unit sphere, by projected
    gradient descent from ``C`` normalised Gaussian vectors drawn from a generator seeded with
    ``seed``. Each of the ``steps`` steps moves every point along the tangent part of
    :math:`-\nabla_{x_i} E`, scaled by ``RIESZ_STEP_SIZE / (C - 1)`` (2 / (C - 1)), with the
    move capped at a tenth of the point's nearest-neighbour distance (so that a near
    collision in the start cannot throw a point across the sphere), then renormalises it.
    The result depends only on the arguments (deterministic for a seed).

    Any ``C >= 2`` and ``D >= 2`` work, ``C > D + 1`` included (where no simplex ETF
    exists); for ``C <= D + 1`` the minimiser is the regular simplex (pairwise cosine
    :math:`-1/(C-1)`), which the default 500 steps reach closely. One step costs
    :math:`O(C^2 D)`.
    """
    num_points = _check_int(num_points, "num_points", 2)
    dim = _check_int(dim, "dim", 2)
    steps = _check_int(steps, "steps", 0)
    generator = torch.Generator().manual_seed(_check_seed(seed))
    points = torch.randn(num_points, dim, generator=generator, dtype=torch.float64)
    points = points / points.norm(dim=1, keepdim=True).clamp_min(1e-12)
    off_diagonal = ~torch.eye(num_points, dtype=torch.bool)
    scale = RIESZ_STEP_SIZE / (num_points - 1)
    for _ in range(steps):
        squared = (2.0 - 2.0 * (points @ points.T)).clamp_min(1e-12)
        # dE/dx_i = -sum_j (x_i - x_j) / ||x_i - x_j||^3; ``force`` is its negative
        weights = torch.where(off_diagonal, squared.pow(-1.5), 0.0)
        force = weights.sum(dim=1, keepdim=True) * points - weights @ points
        force = force - (force * points).sum(dim=1, keepdim=True) * points
        move = scale * force
        nearest = torch.where(off_diagonal, squared, math.inf).min(dim=1, keepdim=True).values
        limit = _RIESZ_MAX_MOVE * nearest.sqrt()
        move = move * (limit / move.norm(dim=1, keepdim=True).clamp_min(1e-300)).clamp(max=1.0)
        points = points + move
        points = points / points.norm(dim=1, keepdim=True)
    return points
