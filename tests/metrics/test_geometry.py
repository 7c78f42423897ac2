import math

import pytest
import torch

from anchorlearn.metrics import (
    center_cosines,
    center_drift,
    class_centers,
    compactness_separability,
    feature_geometry,
    nc1,
)


def _simplex(c: int) -> torch.Tensor:
    """Centred one-hot vectors: a simplex ETF of ``c`` points in ``c`` dimensions."""
    return torch.eye(c, dtype=torch.float64) - 1.0 / c


def test_nc1_zero_for_collapsed_features() -> None:
    labels = torch.arange(4).repeat(5)
    features = _simplex(4)[labels]
    assert nc1(features, labels) == pytest.approx(0.0, abs=1e-12)


def test_nc1_matches_direct_formula() -> None:
    labels = torch.arange(3).repeat_interleave(torch.tensor([4, 6, 5]))
    features = torch.randn(15, 5, dtype=torch.float64) + 3 * torch.randn(3, 5)[labels]
    means = torch.stack([features[labels == c].mean(0) for c in range(3)])
    sw = sum(torch.outer(v, v) for v in features - means[labels]) / 15
    sb = sum(torch.outer(v, v) for v in means - features.mean(0)) / 3
    expected = torch.trace(sw @ torch.linalg.pinv(sb)) / 3
    assert nc1(features, labels) == pytest.approx(float(expected), rel=1e-8)


def test_compactness_on_hand_made_points() -> None:
    # Class 0 at (0, +-1), class 1 at (4, +-1): intra 1, inter 4.
    features = torch.tensor([[0.0, 1.0], [0.0, -1.0], [4.0, 1.0], [4.0, -1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    assert compactness_separability(features, labels) == pytest.approx(
        {"intra": 1.0, "inter": 4.0, "ratio": 0.25}
    )
    torch.testing.assert_close(
        class_centers(features, labels), torch.tensor([[0.0, 0.0], [4.0, 0.0]]).double()
    )


def test_center_cosines_of_simplex() -> None:
    labels = torch.arange(5)
    cos = center_cosines(_simplex(5) + 7.0, labels)
    assert cos["min"] == pytest.approx(-0.25) and cos["max"] == pytest.approx(-0.25)
    assert cos["mean"] == pytest.approx(-0.25)
    assert set(feature_geometry(_simplex(5), labels)) == {
        "nc1",
        "intra",
        "inter",
        "intra_inter_ratio",
        "center_cos_min",
        "center_cos_mean",
        "center_cos_max",
    }


def test_drift_zero_for_rotated_copies_and_positive_otherwise() -> None:
    centers = torch.randn(6, 8, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    shifted = 2.5 * centers @ rotation + torch.randn(8, dtype=torch.float64)
    assert center_drift([centers, shifted, centers @ rotation]) == pytest.approx(0.0, abs=1e-12)
    assert center_drift([centers, torch.randn(6, 3)]) > 0.1


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="at least 2 classes"):
        nc1(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must have shape"):
        nc1(torch.randn(4, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="features must be finite"):
        nc1(torch.tensor([[math.nan], [0.0]]), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="features"):
        nc1(torch.ones(4, 3, dtype=torch.long), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="at least 2 runs"):
        center_drift([torch.randn(3, 2)])
    with pytest.raises(ValueError, match=r"centers_list\[1\] must have C=3"):
        center_drift([torch.randn(3, 2), torch.randn(4, 2)])
    with pytest.raises(TypeError, match="centers_list"):
        center_drift(torch.randn(2, 3, 2))
