"""Self-supervised representation metrics: alignment and uniformity (Wang & Isola 2020),
a weighted kNN classifier (Wu et al. 2018), a linear probe, cluster coagulation, NMI and AMI.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score
from torch import nn

from anchorlearn._checks import (
    check_finite,
    check_float_tensor,
    check_labels_tensor,
    check_num_classes,
    check_positive_int,
)
from anchorlearn.metrics.geometry import compactness_separability

__all__ = [
    "alignment",
    "clustering_scores",
    "coagulation",
    "knn_accuracy",
    "knn_predict",
    "linear_probe_accuracy",
    "low_shot_probe_accuracies",
    "uniformity",
]


def _check_embeddings(z: torch.Tensor, name: str) -> torch.Tensor:
    check_float_tensor(z, name)
    if z.ndim != 2 or z.shape[0] == 0:
        raise ValueError(f"{name} must have shape (N, D) with N > 0, got {tuple(z.shape)}")
    check_finite(z, name)
    return z


def alignment(z1: torch.Tensor, z2: torch.Tensor, alpha: float = 2.0) -> float:
    """``E ||f(x) - f(x+)||_2^alpha`` over positive pairs of L2-normalised embeddings.

    ``z1`` and ``z2`` ``(N, D)``: row ``i`` of each is a view of the same sample. Lower is
    better aligned; in ``[0, 2^alpha]``.
    """
    _check_embeddings(z1, "z1")
    _check_embeddings(z2, "z2")
    if z1.shape != z2.shape:
        raise ValueError(f"z2 must have the shape of z1 {tuple(z1.shape)}, got {tuple(z2.shape)}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    diff = F.normalize(z1.double(), dim=1) - F.normalize(z2.double(), dim=1)
    return float(diff.norm(dim=1).pow(alpha).mean())


def uniformity(z: torch.Tensor, t: float = 2.0) -> float:
    """``log E_{i<j} exp(-t ||f_i - f_j||_2^2)`` of L2-normalised embeddings ``z`` ``(N, D)``.

    Lower is more uniform on the sphere. Uses all ``N (N - 1) / 2`` pairs (memory grows
    quadratically: subsample large sets).
    """
    _check_embeddings(z, "z")
    if z.shape[0] < 2:
        raise ValueError(f"z must have at least 2 rows, got {z.shape[0]}")
    if not t > 0:
        raise ValueError(f"t must be > 0, got {t}")
    sq_dist = torch.pdist(F.normalize(z.double(), dim=1)).pow(2)
    return float(torch.logsumexp(-t * sq_dist, dim=0)) - math.log(sq_dist.numel())


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 256,
    standardize: bool = False,
) -> torch.Tensor:
    """Weighted kNN labels ``(M,)`` of ``test_features`` ``(M, D)`` (Wu et al. 2018).

    With ``standardize``, both feature sets are first standardised per dimension with the
    mean and std of ``train_features`` (the probes' transform). Similarities are cosines
    to ``train_features`` ``(N, D)``; each of the ``k`` nearest
    training samples (all of them if ``N < k``) votes for its label with weight
    ``exp(cos / temperature)``; the class with the largest total wins. Test rows are
    processed ``chunk_size`` at a time, so memory is ``O(chunk_size * N)`` (256 x 60,000
    similarities: about 60 MB).
    """
    _check_embeddings(train_features, "train_features")
    _check_embeddings(test_features, "test_features")
    train_labels = check_labels_tensor(train_labels, "train_labels")
    check_num_classes(num_classes)
    check_positive_int(k, "k")
    check_positive_int(chunk_size, "chunk_size")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if train_labels.shape != train_features.shape[:1]:
        raise ValueError(
            f"train_labels must have shape ({train_features.shape[0]},), "
            f"got {tuple(train_labels.shape)}"
        )
    if test_features.shape[1] != train_features.shape[1]:
        raise ValueError(
            f"test_features must have D={train_features.shape[1]} columns like "
            f"train_features, got {test_features.shape[1]}"
        )
    if bool(((train_labels < 0) | (train_labels >= num_classes)).any()):
        raise ValueError(f"train_labels must lie in [0, {num_classes})")
    if standardize:
        if train_features.shape[0] < 2:
            raise ValueError("standardize needs at least 2 training features")
        reference = train_features.double()
        mean, std = reference.mean(dim=0), reference.std(dim=0).clamp_min(1e-6)
        train_features = ((reference - mean) / std).float()
        test_features = (
            (test_features.double() - mean.to(test_features.device)) / std.to(test_features.device)
        ).float()
    train = F.normalize(train_features.float(), dim=1)
    labels = train_labels.long().to(train.device)
    k = min(k, train.shape[0])
    predictions = []
    for test_chunk in test_features.split(chunk_size):
        sims = F.normalize(test_chunk.float(), dim=1).to(train.device) @ train.T
        top_sims, top_idx = sims.topk(k, dim=1)
        votes = torch.zeros(len(sims), num_classes, device=train.device)
        # weights relative to each row's nearest neighbour: the same vote, no overflow of
        # exp(cos / temperature) at small temperatures
        weights = ((top_sims - top_sims[:, :1]) / temperature).exp()
        votes.scatter_add_(1, labels[top_idx], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 256,
    standardize: bool = False,
) -> float:
    """Top-1 accuracy of :func:`knn_predict` against ``test_labels`` ``(M,)``."""
    test_labels = check_labels_tensor(test_labels, "test_labels")
    if test_labels.shape != test_features.shape[:1]:
        raise ValueError(
            f"test_labels must have shape ({test_features.shape[0]},), "
            f"got {tuple(test_labels.shape)}"
        )
    preds = knn_predict(
        train_features,
        train_labels,
        test_features,
        num_classes,
        k,
        temperature,
        chunk_size,
        standardize=standardize,
    )
    return float((preds.cpu() == test_labels.cpu()).double().mean())


def coagulation(
    features: torch.Tensor, cluster_labels: torch.Tensor, normalize: bool = True
) -> float:
    """Mean intra-cluster spread over mean inter-centroid distance.

    The spread of a cluster is the mean distance of its members to its centroid, averaged
    over clusters; the inter-centroid distance is averaged over all pairs of centroids
    (see :func:`anchorlearn.metrics.geometry.compactness_separability`). Features ``(N, D)``
    are L2-normalised first unless ``normalize=False``. Lower means clusters that are
    tight relative to their separation: more coagulation in the sense of PAUC, members of
    a prototype collapsed together while the prototypes separate.
    """
    check_float_tensor(features, "features")
    if normalize and features.ndim == 2:
        features = F.normalize(features, dim=1)
    return compactness_separability(features, cluster_labels)["ratio"]


def clustering_scores(cluster_labels: torch.Tensor, true_labels: torch.Tensor) -> dict[str, float]:
    """Normalised and adjusted mutual information (``nmi``, ``ami``) between a clustering
    and the true labels, both ``(N,)`` integer tensors (scikit-learn's definitions)."""
    cluster_labels = check_labels_tensor(cluster_labels, "cluster_labels")
    true_labels = check_labels_tensor(true_labels, "true_labels")
    if cluster_labels.ndim != 1 or cluster_labels.shape != true_labels.shape:
        raise ValueError(
            "cluster_labels and true_labels must both have shape (N,), "
            f"got {tuple(cluster_labels.shape)} and {tuple(true_labels.shape)}"
        )
    pred = cluster_labels.cpu().numpy()
    true = true_labels.cpu().numpy()
    return {
        "nmi": float(normalized_mutual_info_score(true, pred)),
        "ami": float(adjusted_mutual_info_score(true, pred)),
    }


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    *,
    steps: int = 100,
    weight_decay: float = 1e-4,
    standardize_with: torch.Tensor | None = None,
) -> float:
    """Top-1 test accuracy of a multinomial logistic regression on frozen features.

    The features ``(N, D)`` / ``(M, D)`` are standardised with the mean and std of
    ``standardize_with`` (``(P, D)``, default the training features: a low-shot probe
    passes every unlabelled training feature, whose statistics a few labels would miss);
    the weights start at zero and are fitted full-batch with LBFGS (strong Wolfe line
    search, at most ``steps`` iterations) on cross-entropy plus ``weight_decay * ||W||^2``.
    Deterministic for given inputs. Labels are ``(N,)`` / ``(M,)`` integers in
    ``[0, num_classes)``.
    """
    _check_embeddings(train_features, "train_features")
    _check_embeddings(test_features, "test_features")
    check_num_classes(num_classes)
    check_positive_int(steps, "steps")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if test_features.shape[1] != train_features.shape[1]:
        raise ValueError(
            f"test_features must have D={train_features.shape[1]} columns like "
            f"train_features, got {test_features.shape[1]}"
        )
    for labels, features, name in (
        (train_labels, train_features, "train_labels"),
        (test_labels, test_features, "test_labels"),
    ):
        check_labels_tensor(labels, name)
        if labels.shape != features.shape[:1]:
            raise ValueError(
                f"{name} must have shape ({features.shape[0]},), got {tuple(labels.shape)}"
            )
    if bool(((train_labels < 0) | (train_labels >= num_classes)).any()):
        raise ValueError(f"train_labels must lie in [0, {num_classes})")
    if standardize_with is None:
        reference, name = train_features, "train_features"
    else:
        reference, name = (
            _check_embeddings(standardize_with, "standardize_with"),
            "standardize_with",
        )
    if reference.shape[1] != train_features.shape[1] or reference.shape[0] < 2:
        raise ValueError(
            f"{name} must be (P >= 2, {train_features.shape[1]}) to standardise with, got "
            f"{tuple(reference.shape)}"
        )
    mean = reference.mean(dim=0)
    std = reference.std(dim=0).clamp_min(1e-6)
    x_train = ((train_features - mean) / std).double()
    x_test = ((test_features - mean) / std).double()
    linear = nn.Linear(x_train.shape[1], num_classes).double()
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(
        linear.parameters(), lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe"
    )
    targets = train_labels.long()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(x_train), targets) + weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        predictions = linear(x_test).argmax(dim=1)
    return float((predictions == test_labels.long()).double().mean())


def low_shot_probe_accuracies(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    shots: int,
    *,
    draws: int = 5,
    seed: int = 0,
    steps: int = 100,
    weight_decay: float = 1e-4,
) -> list[float]:
    """Linear-probe accuracies with ``shots`` labelled training images per class, one per
    draw.

    Each of ``draws`` draws takes ``shots`` images of every class at random (a generator
    seeded with ``seed``; draw ``d`` differs from draw ``d - 1``) and fits
    :func:`linear_probe_accuracy` on them, standardising with the statistics of all the
    training features (unlabelled images are available to a self-supervised method).
    Raises ``ValueError`` naming the class when one has fewer than ``shots`` images.
    """
    check_positive_int(shots, "shots")
    check_positive_int(draws, "draws")
    check_labels_tensor(train_labels, "train_labels")
    counts = torch.bincount(train_labels.long(), minlength=num_classes)
    if int(counts.min()) < shots:
        short = int(counts.argmin())
        raise ValueError(
            f"a {shots}-shot probe needs {shots} training images of every class; class "
            f"{short} has {int(counts[short])}"
        )
    generator = torch.Generator().manual_seed(seed)
    by_class = [torch.nonzero(train_labels == c).flatten() for c in range(num_classes)]
    accuracies = []
    for _ in range(draws):
        picked = torch.cat(
            [rows[torch.randperm(len(rows), generator=generator)[:shots]] for rows in by_class]
        )
        accuracies.append(
            linear_probe_accuracy(
                train_features[picked],
                train_labels[picked],
                test_features,
                test_labels,
                num_classes,
                steps=steps,
                weight_decay=weight_decay,
                standardize_with=train_features,
            )
        )
    return accuracies
