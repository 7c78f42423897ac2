import math

import numpy as np
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
    for center, global_mean in (("class_means", means.mean(0)), ("samples", features.mean(0))):
        sb = sum(torch.outer(v, v) for v in means - global_mean) / 3
        expected = torch.trace(sw @ torch.linalg.pinv(sb)) / 3
        assert nc1(features, labels, center=center) == pytest.approx(float(expected), rel=1e-8)


def numpy_nc1(features: np.ndarray, labels: np.ndarray, global_mean: str) -> float:
    """NC1 written out with numpy loops: Sigma_W over samples, Sigma_B over classes."""
    classes = sorted(set(labels.tolist()))
    means = {c: features[labels == c].mean(axis=0) for c in classes}
    if global_mean == "class_means":
        mu_g = np.mean([means[c] for c in classes], axis=0)
    else:
        mu_g = features.mean(axis=0)
    d = features.shape[1]
    sigma_w = np.zeros((d, d))
    for x, y in zip(features, labels, strict=True):
        sigma_w += np.outer(x - means[y], x - means[y])
    sigma_w /= len(features)
    sigma_b = sum(np.outer(means[c] - mu_g, means[c] - mu_g) for c in classes) / len(classes)
    return float(np.trace(sigma_w @ np.linalg.pinv(sigma_b)) / len(classes))


def test_nc1_under_imbalance_centres_on_the_mean_of_class_means() -> None:
    # 2000 samples of a head class against 10 of each of two tail classes: the sample mean
    # sits on the head class, which inflates Sigma_B and under-states NC1.
    rng = np.random.default_rng(0)
    counts = [2000, 10, 10]
    centres = np.array([[0.0, 0.0, 0.0], [4.0, 0.0, 1.0], [0.0, 4.0, -1.0]])
    labels = np.repeat(np.arange(3), counts)
    features = centres[labels] + rng.normal(size=(len(labels), 3))
    by_class_means = numpy_nc1(features, labels, "class_means")
    by_samples = numpy_nc1(features, labels, "samples")
    assert by_class_means > 1.3 * by_samples  # the two centrings really differ here
    feats, targets = torch.from_numpy(features), torch.from_numpy(labels)
    assert nc1(feats, targets) == pytest.approx(by_class_means, rel=1e-9)
    assert nc1(feats, targets, center="class_means") == pytest.approx(by_class_means, rel=1e-9)
    assert nc1(feats, targets, center="samples") == pytest.approx(by_samples, rel=1e-9)
    assert feature_geometry(feats, targets)["nc1"] == pytest.approx(by_class_means, rel=1e-9)
    geometry = feature_geometry(feats, targets, nc1_center="samples")
    assert geometry["nc1"] == pytest.approx(by_samples, rel=1e-9)
    # balanced classes: the two centrings agree
    balanced = torch.arange(3).repeat(50)
    points = torch.randn(150, 4, dtype=torch.float64) + 3 * torch.randn(3, 4)[balanced]
    assert nc1(points, balanced) == pytest.approx(nc1(points, balanced, center="samples"))


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
    with pytest.raises(ValueError, match=r"center must be one of .*'class_means'.*got 'mean'"):
        nc1(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), center="mean")
    with pytest.raises(ValueError, match=r"nc1_center must be one of .*got 'x'"):
        feature_geometry(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), nc1_center="x")
