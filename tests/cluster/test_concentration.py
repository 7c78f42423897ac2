"""estimate_concentration on hand-made clusters and against a numpy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from anchorlearn.cluster import estimate_concentration


def reference(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray, temp: float) -> np.ndarray:
    """PCL's recipe, written with numpy and a loop over clusters."""
    k = centroids.shape[0]
    phi = np.zeros(k)
    populous = []
    for c in range(k):
        members = x[labels == c]
        if len(members) > 1:
            dists = np.linalg.norm(members - centroids[c], axis=1)
            phi[c] = dists.mean() / np.log(len(members) + 10)
            populous.append(c)
    phi_max = max(phi[c] for c in populous)
    for c in range(k):
        if c not in populous:
            phi[c] = phi_max
    phi = np.clip(phi, np.percentile(phi, 10), np.percentile(phi, 90))
    return temp * phi / phi.mean()


def test_hand_made_clusters_without_clipping() -> None:
    # cluster 0: two points at distance 1 and 3 from the origin centroid; cluster 1: three
    # points at distance 2; cluster 2: a singleton; cluster 3: empty.
    x = torch.tensor(
        [[1.0, 0.0], [0.0, 3.0], [12.0, 0.0], [10.0, 2.0], [10.0, -2.0], [50.0, 50.0]],
        dtype=torch.float64,
    )
    centroids = torch.tensor([[0.0, 0.0], [10.0, 0.0], [50.0, 50.0], [-9.0, -9.0]]).double()
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    phi = estimate_concentration(x, centroids, labels, temperature=1.0, percentiles=(0, 100))
    raw = np.array([2.0 / math.log(12), 2.0 / math.log(13), 0.0, 0.0])
    raw[2:] = raw[:2].max()  # singleton and empty cluster get the largest
    np.testing.assert_allclose(phi.numpy(), raw / raw.mean(), rtol=1e-12)
    assert phi.dtype == torch.float64 and phi.shape == (4,)


def test_percentile_clipping_and_rescaling_match_reference() -> None:
    g = torch.Generator().manual_seed(0)
    k, d = 20, 5
    centroids = torch.randn(k, d, generator=g) * 10
    sizes = [1, 1, 2, 3, 5, 8, 13, 4, 6, 2, 9, 3, 7, 1, 2, 10, 4, 5, 6, 3]
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    spreads = torch.linspace(0.1, 3.0, k)[labels]
    x = centroids[labels] + spreads[:, None] * torch.randn(labels.numel(), d, generator=g)
    phi = estimate_concentration(x, centroids, labels, temperature=0.2)
    expected = reference(x.double().numpy(), centroids.double().numpy(), labels.numpy(), 0.2)
    np.testing.assert_allclose(phi.numpy(), expected, rtol=1e-5)
    assert float(phi.mean()) == pytest.approx(0.2, rel=1e-6)
    # clipping leaves at least 10% of the clusters on each bound
    assert int((phi == phi.min()).sum()) >= 2 and int((phi == phi.max()).sum()) >= 2


def test_all_singletons_or_zero_spread_fall_back_to_temperature() -> None:
    x = torch.randn(4, 3)
    phi = estimate_concentration(x, x.clone(), torch.arange(4), temperature=0.3)
    torch.testing.assert_close(phi, torch.full((4,), 0.3))
    coincident = torch.zeros(6, 3)
    phi = estimate_concentration(coincident, torch.zeros(2, 3), torch.tensor([0, 0, 0, 1, 1, 1]))
    torch.testing.assert_close(phi, torch.full((2,), 0.2))


def test_zero_spread_cluster_stays_positive() -> None:
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [5.0, 1.0], [5.0, -1.0], [9.0, 2.0], [9.0, 0.0]])
    centroids = torch.tensor([[0.0, 0.0], [5.0, 0.0], [9.0, 1.0]])
    phi = estimate_concentration(
        x, centroids, torch.tensor([0, 0, 1, 1, 2, 2]), percentiles=(0, 100)
    )
    assert bool((phi > 0).all()) and torch.isfinite(phi).all()


def test_bad_input_raises() -> None:
    x, c, labels = torch.randn(5, 3), torch.randn(2, 3), torch.tensor([0, 1, 1, 0, 1])
    with pytest.raises(ValueError, match=r"assignments must lie in \[0, 2\)"):
        estimate_concentration(x, c, labels + 1)
    with pytest.raises(ValueError, match="assignments must have shape"):
        estimate_concentration(x, c, labels[:3])
    with pytest.raises(ValueError, match="centroids must have 3 columns"):
        estimate_concentration(x, torch.randn(2, 4), labels)
    with pytest.raises(ValueError, match="x must be finite"):
        estimate_concentration(x.fill_(float("nan")), c, labels)
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        estimate_concentration(torch.randn(5, 3), c, labels, temperature=0.0)
    with pytest.raises(ValueError, match="percentiles must satisfy"):
        estimate_concentration(torch.randn(5, 3), c, labels, percentiles=(90, 10))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_is_estimated_in_float32(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    centroids = torch.randn(6, 8, generator=gen)
    labels = torch.arange(60) % 6
    x = (centroids[labels] + 0.3 * torch.randn(60, 8, generator=gen)).to(dtype)
    phi = estimate_concentration(x, centroids.to(dtype), labels)
    assert phi.dtype == dtype
    expected = estimate_concentration(x.float(), centroids.to(dtype).float(), labels)
    torch.testing.assert_close(phi.float(), expected, rtol=1e-2, atol=1e-3)
