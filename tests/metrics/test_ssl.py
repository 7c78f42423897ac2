import math

import pytest
import torch
import torch.nn.functional as F

from anchorlearn.metrics import (
    alignment,
    clustering_scores,
    coagulation,
    knn_accuracy,
    knn_predict,
    linear_probe_accuracy,
    uniformity,
)
from anchorlearn.metrics.ssl import low_shot_probe_accuracies


def test_alignment_hand_values() -> None:
    z = torch.randn(8, 4)
    assert alignment(z, 3 * z) == pytest.approx(0.0, abs=1e-12)
    assert alignment(z, -z) == pytest.approx(4.0)
    assert alignment(z, -z, alpha=1) == pytest.approx(2.0)


def test_uniformity_matches_direct_formula() -> None:
    z = torch.randn(10, 3, dtype=torch.float64)
    unit = F.normalize(z, dim=1)
    sq = torch.cdist(unit, unit).pow(2)
    mask = torch.triu(torch.ones(10, 10, dtype=torch.bool), 1)
    expected = torch.log(torch.exp(-2 * sq[mask]).mean())
    assert uniformity(z) == pytest.approx(float(expected), rel=1e-9)
    # Two antipodal points: log exp(-2 * 4).
    assert uniformity(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(-8.0)


def test_knn_perfect_on_separable_data_and_chunking() -> None:
    centres = 10 * torch.eye(4)
    train_labels = torch.arange(4).repeat(25)
    train = centres[train_labels] + torch.randn(100, 4)
    test_labels = torch.arange(4).repeat(7)
    test = centres[test_labels] + torch.randn(28, 4)
    assert knn_accuracy(train, train_labels, test, test_labels, 4, k=200, chunk_size=5) == 1.0
    torch.testing.assert_close(
        knn_predict(train, train_labels, test, 4, k=10, chunk_size=3),
        knn_predict(train, train_labels, test, 4, k=10, chunk_size=100),
    )


def test_knn_standardize_is_the_knn_of_features_standardised_with_the_training_stats() -> None:
    gen = torch.Generator().manual_seed(1)
    # non-negative features on very different scales, like pooled ReLU maps
    scale = torch.tensor([100.0, 1.0, 0.01, 5.0])
    train = torch.rand(60, 4, generator=gen) * scale + 3.0
    labels = torch.randint(0, 3, (60,), generator=gen)
    test = torch.rand(20, 4, generator=gen) * scale + 3.0
    mean, std = train.double().mean(0), train.double().std(0)
    by_hand = knn_predict(
        ((train - mean) / std).float(), labels, ((test - mean) / std).float(), 3, k=7
    )
    torch.testing.assert_close(knn_predict(train, labels, test, 3, k=7, standardize=True), by_hand)
    # and it is not a no-op here: the raw cosine is dominated by the first dimension
    raw = knn_predict(train, labels, test, 3, k=7)
    assert not torch.equal(raw, by_hand)
    # already standardised features (the pixel floor) are left as they are
    z_train, z_test = ((train - mean) / std).float(), ((test - mean) / std).float()
    torch.testing.assert_close(
        knn_predict(z_train, labels, z_test, 3, k=7, standardize=True), by_hand
    )
    with pytest.raises(ValueError, match="at least 2"):
        knn_predict(train[:1], labels[:1], test, 3, standardize=True)


def test_knn_weights_votes_by_similarity() -> None:
    # One very close neighbour of class 1 outweighs two distant ones of class 0.
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([1, 0, 0])
    test = torch.tensor([[1.0, 0.05]])
    assert knn_predict(train, labels, test, 2, k=3, temperature=0.1).tolist() == [1]


def test_knn_at_a_tiny_temperature_votes_like_the_nearest_neighbour() -> None:
    # exp(cos / 0.001) overflows float32: the weights must be taken relative to each row's
    # nearest neighbour. Each test point is a slightly moved training point, its nearest
    # neighbour by a cosine margin of more than 0.05: every other weight is below e^-50.
    gen = torch.Generator().manual_seed(0)
    train = torch.randn(300, 16, generator=gen)
    labels = torch.randint(0, 5, (300,), generator=gen)
    test = train[:50] + 0.01 * torch.randn(50, 16, generator=gen)
    top2 = (F.normalize(test, dim=1) @ F.normalize(train, dim=1).T).topk(2, dim=1)
    assert torch.equal(top2.indices[:, 0], torch.arange(50))
    assert bool((top2.values[:, 0] - top2.values[:, 1] > 0.05).all())
    predicted = knn_predict(train, labels, test, 5, k=200, temperature=1e-3)
    assert torch.equal(predicted, labels[:50])


def test_coagulation_and_clustering_scores() -> None:
    labels = torch.arange(3).repeat(10)
    tight = F.one_hot(labels, 3).float() + 0.01 * torch.randn(30, 3)
    loose = F.one_hot(labels, 3).float() + 1.0 * torch.randn(30, 3)
    assert coagulation(tight, labels) < coagulation(loose, labels)
    scores = clustering_scores((labels + 1) % 3, labels)
    assert scores == pytest.approx({"nmi": 1.0, "ami": 1.0})
    assert clustering_scores(torch.zeros(30, dtype=torch.long), labels)["nmi"] == pytest.approx(0)


def test_bad_inputs() -> None:
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="z2 must have the shape"):
        alignment(z, z[:2])
    with pytest.raises(ValueError, match="t must be > 0"):
        uniformity(z, t=0)
    with pytest.raises(ValueError, match="z must be finite"):
        uniformity(torch.tensor([[math.inf, 0.0], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="test_features must have D=3"):
        knn_predict(z, torch.tensor([0, 1, 0, 1]), torch.randn(2, 5), 2)
    with pytest.raises(ValueError, match="train_labels must lie"):
        knn_predict(z, torch.tensor([0, 1, 0, 2]), z, 2)
    with pytest.raises(ValueError, match="temperature"):
        knn_predict(z, torch.tensor([0, 1, 0, 1]), z, 2, temperature=0.0)
    with pytest.raises(ValueError, match="cluster_labels and true_labels"):
        clustering_scores(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long))


def test_linear_probe_separates_separable_features() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 4
    centres = torch.randn(4, 8, generator=generator) * 4
    features = centres[labels] + torch.randn(200, 8, generator=generator)
    acc = linear_probe_accuracy(features[:150], labels[:150], features[150:], labels[150:], 4)
    assert acc > 0.95


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"train_labels": torch.arange(9) % 3}, ValueError, r"train_labels must have shape"),
        ({"test_labels": torch.zeros(5, 1)}, TypeError, "test_labels must be an integer tensor"),
        ({"test_features": torch.zeros(6, 3)}, ValueError, "must have D=4 columns"),
        ({"train_labels": torch.arange(10) % 4}, ValueError, r"train_labels must lie in \[0, 3\)"),
        ({"num_classes": 1}, ValueError, "num_classes must be >= 2, got 1"),
        ({"steps": 0}, ValueError, "steps must be >= 1, got 0"),
        ({"weight_decay": -1.0}, ValueError, "weight_decay must be >= 0, got -1.0"),
        ({"train_features": torch.full((10, 4), float("nan"))}, ValueError, "train_features"),
    ],
)
def test_linear_probe_bad_inputs_name_the_argument(change: dict, error, message: str) -> None:
    args = {
        "train_features": torch.randn(10, 4),
        "train_labels": torch.arange(10) % 3,
        "test_features": torch.randn(6, 4),
        "test_labels": torch.arange(6) % 3,
        "num_classes": 3,
    }
    args.update(change)
    with pytest.raises(error, match=message):
        linear_probe_accuracy(**args)


def _clusters(n_per_class: int, num_classes: int = 4, spread: float = 1.0, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat(n_per_class)
    centres = torch.randn(num_classes, 8, generator=generator) * 4
    return centres[labels] + spread * torch.randn(len(labels), 8, generator=generator), labels


def test_low_shot_probe_one_label_per_class_suffices_for_separated_classes() -> None:
    train, train_labels = _clusters(30)
    noise = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
    test, test_labels = train[:40] + 0.1 * noise, train_labels[:40]  # the same centres
    accs = low_shot_probe_accuracies(train, train_labels, test, test_labels, 4, 1, draws=3)
    assert len(accs) == 3 and all(a == 1.0 for a in accs)


def test_low_shot_probe_draws_differ_and_repeat_with_the_seed() -> None:
    train, labels = _clusters(40, spread=6.0)
    test, test_labels = train[:80], labels[:80]
    first = low_shot_probe_accuracies(train, labels, test, test_labels, 4, 2, draws=6, seed=3)
    again = low_shot_probe_accuracies(train, labels, test, test_labels, 4, 2, draws=6, seed=3)
    other = low_shot_probe_accuracies(train, labels, test, test_labels, 4, 2, draws=6, seed=4)
    assert first == again
    assert len(set(first)) > 1  # the draws pick different images
    assert first != other


def test_low_shot_probe_standardises_with_every_training_feature(monkeypatch) -> None:
    import anchorlearn.metrics.ssl as ssl_metrics

    seen = []
    real = ssl_metrics.linear_probe_accuracy

    def spy(*args, **kwargs):
        seen.append(kwargs["standardize_with"])
        assert args[0].shape[0] == 4 * 5  # 5 labelled images of each of 4 classes
        return real(*args, **kwargs)

    monkeypatch.setattr(ssl_metrics, "linear_probe_accuracy", spy)
    train, labels = _clusters(20)
    ssl_metrics.low_shot_probe_accuracies(train, labels, train, labels, 4, 5, draws=2)
    assert len(seen) == 2 and all(s is train for s in seen)


def test_low_shot_probe_names_a_class_with_too_few_images() -> None:
    train, labels = _clusters(5)
    labels = labels.clone()
    labels[labels == 2] = 1
    labels[0] = 2  # class 2 keeps a single image
    with pytest.raises(
        ValueError, match="3-shot probe needs 3 training images of every class; class 2 has 1"
    ):
        low_shot_probe_accuracies(train, labels, train, labels, 4, 3)


def test_linear_probe_standardize_with_sets_the_statistics() -> None:
    train, labels = _clusters(20, spread=5.0)
    test, test_labels = _clusters(20, spread=5.0, seed=0)
    test = test + torch.randn(test.shape, generator=torch.Generator().manual_seed(2))
    reference = 3.0 * torch.randn(50, 8, generator=torch.Generator().manual_seed(3)) + 7.0
    mean, std = reference.mean(0), reference.std(0)
    by_hand = linear_probe_accuracy(
        (train - mean) / std,
        labels,
        (test - mean) / std,
        test_labels,
        4,
        steps=3,
        standardize_with=(reference - mean) / std,
    )
    given = linear_probe_accuracy(
        train, labels, test, test_labels, 4, steps=3, standardize_with=reference
    )
    own = linear_probe_accuracy(train, labels, test, test_labels, 4, steps=3)
    assert given == pytest.approx(by_hand, abs=1e-9)
    # a few LBFGS steps from zero depend on the scaling: the reference is really used
    assert given != own
    with pytest.raises(ValueError, match="standardize_with must be"):
        linear_probe_accuracy(train, labels, train, labels, 4, standardize_with=train[:, :3])
    with pytest.raises(ValueError, match=r"train_features must be \(P >= 2, 8\)"):
        linear_probe_accuracy(train[:1], labels[:1], train, labels, 4)
