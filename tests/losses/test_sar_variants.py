"""SemanticAnchorRegularizer's options: anchor_init, pull (with the l2_margin hinge),
class_weights and gate, the class_balanced_weights helper, and the point sets of
anchorlearn._geometry behind them."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from tests.engine.runfixtures import digits_config
from torch import nn

import anchorlearn.models
import anchorlearn.models.etf
from anchorlearn import _geometry
from anchorlearn._geometry import riesz_uniform_points, simplex_etf
from anchorlearn.engine.config import parse_config
from anchorlearn.engine.objective import build_objective, loss_parameters
from anchorlearn.engine.schema import ConfigError
from anchorlearn.losses.sar import SemanticAnchorRegularizer, _masked_pull, class_balanced_weights

C, D = 4, 16
IGNORE = 255


# --- helpers -----------------------------------------------------------------------------


class OpenClassifier:
    """``P @ W.T + 30 I``: every anchor is confidently its own class, so the gate opens."""

    def __init__(self, num_classes: int = C, feat_dim: int = D) -> None:
        self.weight_matrix = 0.01 * torch.randn(num_classes, feat_dim)
        self.margins = 30.0 * torch.eye(num_classes)

    def __call__(self, projected: torch.Tensor) -> torch.Tensor:
        return projected @ self.weight_matrix.to(projected.dtype).T + self.margins.to(projected)


def make_sar(**kwargs) -> SemanticAnchorRegularizer:
    args = {"projector": nn.Linear(D, D), "seed": 0} | kwargs
    return SemanticAnchorRegularizer(C, D, OpenClassifier(), **args)


def flat_batch(n: int = 12, dtype: torch.dtype = torch.float32):
    features = torch.randn(n, D, dtype=dtype)
    labels = torch.randint(0, C, (n,))
    labels[:2] = IGNORE
    return features, labels


def dense_batch(b: int = 2, h: int = 4, w: int = 5, dtype: torch.dtype = torch.float32):
    features = torch.randn(b, D, h, w, dtype=dtype)
    labels = torch.randint(0, C, (b, h, w))
    labels[:, 0, :2] = IGNORE
    return features, labels


def positions(features: torch.Tensor, labels: torch.Tensor):
    """``(f, y)`` per position, ``f`` a ``(D,)`` vector, for both feature layouts."""
    if features.ndim == 2:
        yield from zip(features, labels.tolist(), strict=True)
        return
    b, _, h, w = features.shape
    for i, r, c in itertools.product(range(b), range(h), range(w)):
        yield features[i, :, r, c], int(labels[i, r, c])


def loop_pull(
    features, labels, anchors, kind: str, weights=None, margin: float = 0.0, classes=None
) -> torch.Tensor:
    """``sum w[y] d / sum w[y]`` over the valid positions, one position at a time; only the
    positions whose class is in ``classes`` (a list) when it is given."""
    total, weight_sum = features.new_zeros(()), 0.0
    for f, y in positions(features, labels):
        if y == IGNORE or (classes is not None and y not in classes):
            continue
        a = anchors[y].to(f.dtype)
        if kind == "l2":
            d = ((f - a) ** 2).sum() / f.numel()
        elif kind == "l2_margin":
            d = torch.clamp(((f - a) ** 2).sum() / f.numel() - margin, min=0)
        else:
            d = 1 - torch.dot(f, a) / (max(f.norm(), 1e-8) * max(a.norm(), 1e-8))
        w = 1.0 if weights is None else float(weights[y])
        total = total + w * d
        weight_sum += w
    return total / weight_sum if weight_sum > 0 else total


def pairwise_cosines(rows: torch.Tensor) -> torch.Tensor:
    unit = rows / rows.norm(dim=1, keepdim=True)
    cos = unit @ unit.T
    return cos[~torch.eye(rows.shape[0], dtype=torch.bool)]


def min_distance(points: torch.Tensor) -> float:
    dist = torch.cdist(points, points)
    dist.fill_diagonal_(math.inf)
    return float(dist.min())


def riesz_energy(points: torch.Tensor) -> float:
    dist = torch.pdist(points)
    return float((1.0 / dist).sum())


def gaussian_start(num_points: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(num_points, dim, generator=generator, dtype=torch.float64)
    return start / start.norm(dim=1, keepdim=True)


# --- the defaults are the release ----------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 7])
def test_default_anchors_are_the_release_draw(seed: int) -> None:
    expected = torch.randn(C, D, generator=torch.Generator().manual_seed(seed))
    sar = SemanticAnchorRegularizer(C, D, OpenClassifier(), seed=seed)
    assert torch.equal(sar.anchors, expected)
    explicit = SemanticAnchorRegularizer(
        C, D, OpenClassifier(), seed=seed, anchor_init="gaussian", pull="l2", class_weights=None
    )
    assert torch.equal(explicit.anchors, expected)
    assert sar.class_weights is None
    own_state = [k for k in sar.state_dict() if not k.startswith("projector.")]
    assert own_state == ["anchors", "semantic_anchors", "step", "gate_open_step"]


def test_default_anchors_without_seed_follow_the_global_generator() -> None:
    classifier, projector = OpenClassifier(), nn.Identity()  # built before: no draws left
    torch.manual_seed(11)
    expected = torch.randn(C, D)
    torch.manual_seed(11)
    sar = SemanticAnchorRegularizer(C, D, classifier, projector=projector)
    assert torch.equal(sar.anchors, expected)


def test_default_pull_is_the_release_mean_squared_distance_bit_for_bit() -> None:
    sar = make_sar()
    features, labels = flat_batch()
    out = sar(features, labels)
    assert out["gate_open"] is True
    semantic = sar.semantic_anchors
    valid = labels != IGNORE
    safe = torch.where(valid, labels, 0)
    per_position = (features - semantic[safe]).pow(2).sum(dim=1)
    expected = (per_position * valid).sum() / (valid.sum().clamp_min(1) * D)
    assert torch.equal(out["pull"], expected)
    assert set(out) == {"loss", "aux_ce", "pull", "gate_open", "gate_open_fraction"}


# --- anchor_init ---------------------------------------------------------------------------


def test_etf_anchors_are_a_scaled_simplex_etf() -> None:
    sar = make_sar(anchor_init="etf", seed=3)
    expected = math.sqrt(D) * simplex_etf(D, C, seed=3).T
    assert sar.anchors.dtype == torch.get_default_dtype()
    torch.testing.assert_close(sar.anchors, expected.float())
    torch.testing.assert_close(sar.anchors.norm(dim=1), torch.full((C,), math.sqrt(D)))
    cos = pairwise_cosines(sar.anchors.double())
    torch.testing.assert_close(cos, torch.full_like(cos, -1 / (C - 1)), rtol=0, atol=1e-6)
    assert not torch.allclose(sar.anchors, make_sar(anchor_init="etf", seed=4).anchors)


def test_uniform_anchors_are_scaled_riesz_points() -> None:
    sar = make_sar(anchor_init="uniform", seed=5)
    expected = math.sqrt(D) * riesz_uniform_points(C, D, seed=5)
    torch.testing.assert_close(sar.anchors, expected.float())
    torch.testing.assert_close(sar.anchors.norm(dim=1), torch.full((C,), math.sqrt(D)))


def test_uniform_anchors_work_with_more_classes_than_dimensions() -> None:
    num_classes, feat_dim = 12, 3
    sar = SemanticAnchorRegularizer(
        num_classes, feat_dim, OpenClassifier(num_classes, feat_dim), anchor_init="uniform", seed=0
    )
    assert sar.anchors.shape == (num_classes, feat_dim)
    assert min_distance(sar.anchors) > 0.5 * math.sqrt(feat_dim)
    with pytest.raises(ValueError, match=r"anchor_init='etf'.*num_classes=12.*feat_dim=3.*uniform"):
        SemanticAnchorRegularizer(
            num_classes, feat_dim, OpenClassifier(num_classes, feat_dim), anchor_init="etf"
        )
    with pytest.raises(
        ValueError, match=r"anchor_init='uniform' needs feat_dim >= 2, got feat_dim=1"
    ):
        SemanticAnchorRegularizer(2, 1, lambda p: p.repeat(1, 2), anchor_init="uniform")


@pytest.mark.parametrize("anchor_init", ["etf", "uniform"])
def test_unseeded_anchors_follow_the_global_generator(anchor_init: str) -> None:
    torch.manual_seed(21)
    a = make_sar(anchor_init=anchor_init, seed=None).anchors
    torch.manual_seed(21)
    b = make_sar(anchor_init=anchor_init, seed=None).anchors
    torch.manual_seed(22)
    c = make_sar(anchor_init=anchor_init, seed=None).anchors
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (
            {"anchor_init": "random"},
            ValueError,
            r"anchor_init must be one of 'gaussian', .*'random'",
        ),
        ({"anchor_init": None}, TypeError, r"anchor_init must be one of .* got NoneType None"),
        ({"pull": "L2"}, ValueError, r"pull must be one of 'l2', 'cosine', 'l2_margin', got 'L2'"),
        ({"pull": 2}, TypeError, r"pull must be one of .* got int 2"),
        ({"class_weights": [1.0] * C}, TypeError, r"class_weights must be None or a torch.Tensor"),
        (
            {"class_weights": torch.ones(C + 1)},
            ValueError,
            rf"class_weights .*\({C},\).*\({C + 1},",
        ),
        ({"class_weights": torch.ones(C, 1)}, ValueError, r"class_weights must have shape"),
        ({"class_weights": torch.tensor([1.0, -1, 1, 1])}, ValueError, r"class_weights.*>= 0"),
        ({"class_weights": torch.tensor([1.0, math.nan, 1, 1])}, ValueError, r"weights.*finite"),
        ({"class_weights": torch.tensor([1.0, math.inf, 1, 1])}, ValueError, r"weights.*finite"),
        ({"class_weights": torch.zeros(C)}, ValueError, r"class_weights must not be all zero"),
        ({"class_weights": torch.ones(C, dtype=torch.bool)}, TypeError, r"class_weights.*bool"),
    ],
)
def test_bad_option_values_raise(kwargs, error, pattern) -> None:
    with pytest.raises(error, match=pattern):
        make_sar(**kwargs)


def test_extra_repr_names_the_options() -> None:
    text = repr(make_sar(anchor_init="etf", pull="cosine", class_weights=torch.ones(C)))
    assert "anchor_init='etf'" in text and "pull='cosine'" in text
    assert "class_weights=tensor" in text
    assert "class_weights=None" in repr(make_sar())


# --- the point sets ------------------------------------------------------------------------


def test_simplex_etf_keeps_its_import_paths() -> None:
    assert anchorlearn.models.etf.simplex_etf is _geometry.simplex_etf
    assert anchorlearn.models.simplex_etf is _geometry.simplex_etf


def test_riesz_points_spread_far_wider_than_their_gaussian_start() -> None:
    start = gaussian_start(50, 8, seed=0)
    assert torch.equal(riesz_uniform_points(50, 8, seed=0, steps=0), start)
    points = riesz_uniform_points(50, 8, seed=0)
    assert points.shape == (50, 8) and points.dtype == torch.float64
    torch.testing.assert_close(points.norm(dim=1), torch.ones(50, dtype=torch.float64))
    assert min_distance(points) > 1.8 * min_distance(start)
    assert riesz_energy(points) < riesz_energy(start)


@pytest.mark.parametrize(("num_points", "dim"), [(3, 2), (9, 8), (21, 20)])
def test_riesz_points_reach_the_simplex_when_one_exists(num_points: int, dim: int) -> None:
    cos = pairwise_cosines(riesz_uniform_points(num_points, dim, seed=1))
    target = torch.full_like(cos, -1 / (num_points - 1))
    torch.testing.assert_close(cos, target, rtol=0, atol=1e-2)
    start_cos = pairwise_cosines(gaussian_start(num_points, dim, seed=1))
    assert float((start_cos - target).abs().max()) > 0.1  # the descent did the work


def test_riesz_points_are_deterministic_for_a_seed() -> None:
    a = riesz_uniform_points(10, 4, seed=2, steps=50)
    assert torch.equal(a, riesz_uniform_points(10, 4, seed=2, steps=50))
    assert not torch.allclose(a, riesz_uniform_points(10, 4, seed=3, steps=50))


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "pattern"),
    [
        ((1, 4), {"seed": 0}, ValueError, r"num_points must be >= 2, got 1"),
        ((4, 1), {"seed": 0}, ValueError, r"dim must be >= 2, got 1"),
        ((4, 3), {"seed": 0, "steps": -1}, ValueError, r"steps must be >= 0, got -1"),
        ((4.0, 3), {"seed": 0}, TypeError, r"num_points must be an int, got float"),
        ((4, 3), {"seed": None}, TypeError, r"seed must be an int, got NoneType None"),
    ],
)
def test_riesz_bad_arguments_raise(args, kwargs, error, pattern) -> None:
    with pytest.raises(error, match=pattern):
        riesz_uniform_points(*args, **kwargs)


# --- pull="cosine" -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dense", [False, True])
def test_cosine_pull_matches_a_loop(dense: bool, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    anchors = torch.randn(C, D, dtype=dtype, requires_grad=True)
    features, labels = dense_batch(dtype=dtype) if dense else flat_batch(dtype=dtype)
    features.requires_grad_()
    pull = _masked_pull(features, labels, anchors, IGNORE, kind="cosine")
    expected = loop_pull(features, labels, anchors.detach(), "cosine")
    assert pull.dtype == dtype
    torch.testing.assert_close(pull, expected)
    grads = torch.autograd.grad(pull, [features, anchors], allow_unused=True)
    (expected_grad,) = torch.autograd.grad(expected, features)
    torch.testing.assert_close(grads[0], expected_grad)
    assert grads[1] is None


@pytest.mark.parametrize("dense", [False, True])
def test_cosine_pull_ignores_void_positions(dense: bool) -> None:
    anchors = torch.randn(C, D)
    features, labels = dense_batch() if dense else flat_batch()
    pull = _masked_pull(features, labels, anchors, IGNORE, kind="cosine")
    void = labels == IGNORE
    moved = features.clone()
    if dense:
        moved.permute(0, 2, 3, 1)[void] = 100 * torch.randn(int(void.sum()), D)
    else:
        moved[void] = 100 * torch.randn(int(void.sum()), D)
    assert torch.equal(_masked_pull(moved, labels, anchors, IGNORE, kind="cosine"), pull)
    # counting a void position as a valid one would change the mean
    relabelled = torch.where(void, torch.zeros_like(labels), labels)
    assert not torch.allclose(_masked_pull(moved, relabelled, anchors, None, kind="cosine"), pull)


def test_cosine_pull_is_one_and_finite_for_zero_features() -> None:
    anchors = torch.randn(C, D)
    features = torch.zeros(3, D, requires_grad=True)
    labels = torch.tensor([0, 1, 2])
    pull = _masked_pull(features, labels, anchors, IGNORE, kind="cosine")
    assert float(pull.detach()) == 1.0
    (grad,) = torch.autograd.grad(pull, features)
    assert bool(torch.isfinite(grad).all())


def test_cosine_pull_is_zero_on_the_anchor_direction_and_two_opposite() -> None:
    anchors = torch.randn(C, D)
    labels = torch.arange(C)
    assert abs(float(_masked_pull(3 * anchors, labels, anchors, None, kind="cosine"))) < 1e-6
    torch.testing.assert_close(
        _masked_pull(-anchors, labels, anchors, None, kind="cosine"), torch.tensor(2.0)
    )


def test_cosine_pull_under_bf16_autocast_is_float32() -> None:
    anchors = torch.randn(C, D)
    features, labels = flat_batch()
    expected = loop_pull(features, labels, anchors, "cosine")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pull = _masked_pull(features.bfloat16(), labels, anchors, IGNORE, kind="cosine")
    assert pull.dtype == torch.float32
    torch.testing.assert_close(pull, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dense", [False, True])
def test_module_cosine_pull_uses_the_semantic_anchors(dense: bool) -> None:
    sar = make_sar(pull="cosine")
    features, labels = dense_batch() if dense else flat_batch()
    features.requires_grad_()
    projected = sar.projected_anchors().detach()
    out = sar(features, labels)
    assert out["gate_open"] is True
    expected = loop_pull(features, labels, projected, "cosine")
    torch.testing.assert_close(out["pull"], expected)
    torch.testing.assert_close(out["loss"], out["aux_ce"] + 0.1 * expected)
    (grad,) = torch.autograd.grad(out["pull"], features)
    (expected_grad,) = torch.autograd.grad(expected, features)
    torch.testing.assert_close(grad, expected_grad)


# --- class_weights -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["l2", "cosine"])
@pytest.mark.parametrize("dense", [False, True])
def test_weighted_pull_matches_a_loop(dense: bool, kind: str) -> None:
    torch.manual_seed(1)
    anchors = torch.randn(C, D)
    weights = torch.tensor([0.5, 2.0, 0.0, 1.5])
    features, labels = dense_batch() if dense else flat_batch()
    features.requires_grad_()
    pull = _masked_pull(features, labels, anchors, IGNORE, kind=kind, class_weights=weights)
    expected = loop_pull(features, labels, anchors, kind, weights)
    torch.testing.assert_close(pull, expected)
    unweighted = _masked_pull(features, labels, anchors, IGNORE, kind=kind)
    assert not torch.allclose(pull, unweighted)
    (grad,) = torch.autograd.grad(pull, features)
    (expected_grad,) = torch.autograd.grad(expected, features)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("value", [1.0, 2.5])
@pytest.mark.parametrize("kind", ["l2", "cosine"])
@pytest.mark.parametrize("dense", [False, True])
def test_equal_weights_give_the_unweighted_pull(dense: bool, kind: str, value: float) -> None:
    anchors = torch.randn(C, D)
    features, labels = dense_batch() if dense else flat_batch()
    weights = torch.full((C,), value)
    weighted = _masked_pull(features, labels, anchors, IGNORE, kind=kind, class_weights=weights)
    unweighted = _masked_pull(features, labels, anchors, IGNORE, kind=kind)
    torch.testing.assert_close(weighted, unweighted, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", ["l2", "cosine"])
@pytest.mark.parametrize("dense", [False, True])
def test_zero_weight_removes_a_class(dense: bool, kind: str) -> None:
    anchors = torch.randn(C, D)
    features, labels = dense_batch() if dense else flat_batch()
    labels[labels == IGNORE] = 1
    labels.view(-1)[:3] = 2  # class 2 is present
    weights = torch.tensor([1.0, 1.0, 0.0, 1.0])
    features.requires_grad_()
    pull = _masked_pull(features, labels, anchors, IGNORE, kind=kind, class_weights=weights)
    without = torch.where(labels == 2, torch.full_like(labels, IGNORE), labels)
    expected = _masked_pull(features, without, anchors, IGNORE, kind=kind)
    torch.testing.assert_close(pull, expected, rtol=1e-6, atol=0)
    (grad,) = torch.autograd.grad(pull, features)
    on_class_2 = (labels == 2)[:, None].expand_as(grad)
    assert torch.equal(grad[on_class_2], torch.zeros_like(grad[on_class_2]))


@pytest.mark.parametrize("dense", [False, True])
def test_only_zero_weight_classes_give_a_finite_zero_pull(dense: bool) -> None:
    anchors = torch.randn(C, D)
    features, labels = dense_batch() if dense else flat_batch()
    labels[labels != IGNORE] = 3
    features.requires_grad_()
    weights = torch.tensor([1.0, 1.0, 1.0, 0.0])
    for kind in ("l2", "cosine"):
        pull = _masked_pull(features, labels, anchors, IGNORE, kind=kind, class_weights=weights)
        assert float(pull.detach()) == 0.0
        (grad,) = torch.autograd.grad(pull, features)
        assert torch.equal(grad, torch.zeros_like(grad))


def test_module_class_weights_reach_the_pull_and_move_with_the_module() -> None:
    weights = torch.tensor([0.5, 2.0, 0.0, 1.5], dtype=torch.float64)
    sar = make_sar(class_weights=weights)
    assert sar.class_weights.dtype == torch.float32
    weights[0] = 100.0  # a copy is kept
    assert float(sar.class_weights[0]) == 0.5
    assert "class_weights" not in sar.state_dict()
    assert dict(sar.named_buffers())["class_weights"] is sar.class_weights

    features, labels = flat_batch()
    projected = sar.projected_anchors().detach()
    out = sar(features, labels)
    expected = loop_pull(features, labels, projected, "l2", sar.class_weights)
    torch.testing.assert_close(out["pull"], expected)

    sar64 = make_sar(class_weights=torch.tensor([0.5, 2.0, 0.0, 1.5])).to(torch.float64)
    assert sar64.class_weights.dtype == torch.float64
    plain = make_sar()
    plain.load_state_dict(sar.state_dict())  # the weights are a setting, not state
    assert plain.class_weights is None


# --- class_balanced_weights ----------------------------------------------------------------


def test_inverse_frequency_weights_by_hand() -> None:
    weights = class_balanced_weights([100, 10, 0, 1])
    raw = torch.tensor([0.01, 0.1, 0.0, 1.0])
    torch.testing.assert_close(weights, raw * 4 / 1.11)
    assert weights.dtype == torch.float32 and weights.shape == (4,)
    torch.testing.assert_close(weights.mean(), torch.tensor(1.0))
    torch.testing.assert_close(class_balanced_weights(torch.tensor([100, 10, 0, 1])), weights)


def test_effective_number_weights_by_hand() -> None:
    weights = class_balanced_weights([1, 2, 0], kind="effective", beta=0.9)
    raw = torch.tensor([1.0, 0.1 / 0.19, 0.0])
    torch.testing.assert_close(weights, raw * 3 / float(raw.sum()))
    torch.testing.assert_close(weights.mean(), torch.tensor(1.0))
    # beta = 0 counts every present class once
    equal = class_balanced_weights([5, 50, 0, 500], kind="effective", beta=0.0)
    torch.testing.assert_close(equal, torch.tensor([4 / 3, 4 / 3, 0.0, 4 / 3]))


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "pattern"),
    [
        (([1, 2],), {"kind": "sqrt"}, ValueError, r"kind must be one of 'inverse', 'effective'"),
        (([1, 2],), {"kind": "effective", "beta": 1.0}, ValueError, r"beta must lie in \[0, 1\)"),
        (([1, 2],), {"kind": "effective", "beta": 1.5}, ValueError, r"beta must lie in \[0, 1\]"),
        (([1, 2],), {"beta": -0.5}, ValueError, r"beta must lie in \[0, 1\], got -0.5"),
        (([1, -2],), {}, ValueError, r"counts must be finite and >= 0"),
        (([0, 0],), {}, ValueError, r"counts must have at least one positive entry"),
        (([3],), {}, ValueError, r"counts must be 1-D with one entry per class"),
        ((torch.ones(2, 2),), {}, ValueError, r"counts must be 1-D .* got shape \(2, 2\)"),
        ((torch.ones(2, dtype=torch.bool),), {}, TypeError, r"counts must hold real numbers"),
        (([1, "2"],), {}, TypeError, r"counts must hold real numbers"),
        (("12",), {}, TypeError, r"counts must be a sequence or a tensor, got str"),
    ],
)
def test_class_balanced_weights_bad_arguments_raise(args, kwargs, error, pattern) -> None:
    with pytest.raises(error, match=pattern):
        class_balanced_weights(*args, **kwargs)


# --- from a config -------------------------------------------------------------------------


class StubModel(nn.Module):
    def __init__(self, feat_dim: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.feat_dim = feat_dim
        self.classifier = nn.Linear(feat_dim, num_classes)


def objective_from(sar_params: dict, class_counts: list[int] | None = None):
    raw = digits_config(losses=["ce", {"name": "sar", **sar_params}])
    specs = parse_config(raw).losses
    return build_objective(specs, model=StubModel(), num_classes=10, class_counts=class_counts)


def test_string_options_come_from_a_config() -> None:
    assert {"anchor_init", "pull", "class_weights", "gate", "margin"} <= set(loss_parameters("sar"))
    objective = objective_from({"anchor_init": "etf", "pull": "cosine", "seed": 0})
    sar = objective.terms[1]
    assert sar.anchor_init == "etf" and sar.pull == "cosine"
    torch.testing.assert_close(sar.anchors, math.sqrt(16) * simplex_etf(16, 10, seed=0).T.float())


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"anchor_init": "sphere"}, r"loss sar: anchor_init must be one of"),
        ({"pull": "l1"}, r"loss sar: pull must be one of"),
        # a config names the weighting; a tensor of weights is set in Python only
        ({"class_weights": [1.0] * 10}, r"losses\.1\.class_weights must be 'inverse'"),
        ({"class_weights": "effective:1.5"}, r"got 'effective:1\.5'"),
        ({"class_weights": "inverse:0.9"}, r"got 'inverse:0\.9'"),
    ],
)
def test_bad_options_from_a_config_are_config_errors(params: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        objective_from(params)


@pytest.mark.parametrize(
    ("name", "kind", "beta"),
    [
        ("inverse", "inverse", 0.999),
        ("effective", "effective", 0.999),
        ("effective:0.9", "effective", 0.9),
    ],
)
def test_a_config_names_the_class_weights_and_the_engine_computes_them(
    name: str, kind: str, beta: float
) -> None:
    counts = [500, 300, 200, 100, 80, 60, 40, 20, 10, 5]
    sar = objective_from({"class_weights": name}, class_counts=counts).terms[1]
    torch.testing.assert_close(sar.class_weights, class_balanced_weights(counts, kind, beta))
    assert sar.class_weights[-1] > sar.class_weights[0]
    with pytest.raises(ConfigError, match="class_weights needs training class counts"):
        objective_from({"class_weights": name})


# --- gate="per_class" ----------------------------------------------------------------------


def per_class_sar(confident: list[float], **kwargs) -> SemanticAnchorRegularizer:
    """A per-class-gated SAR whose anchor ``i`` has own-class margin ``confident[i]``: 30
    passes (p ~ 1), 0 fails (p ~ 1/C)."""
    sar = make_sar(gate="per_class", **kwargs)
    sar.classifier.margins = torch.diag(torch.tensor(confident))
    return sar


def nudge_projector(sar: SemanticAnchorRegularizer, scale: float = 0.3) -> None:
    with torch.no_grad():
        sar.projector.weight.add_(scale * torch.randn(D, D))


def all_classes(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``labels`` with every class present in the batch at least twice."""
    labels = labels.clone()
    flat = labels.view(-1)
    flat[2 : 2 + 2 * C] = torch.arange(C).repeat(2)
    return labels


def test_gate_options_default_to_the_release() -> None:
    sar = make_sar()
    assert sar.gate == "all" and sar.margin == 0.0 and sar.pull == "l2"
    assert "class_open_step" not in sar.state_dict()
    per_class = make_sar(gate="per_class")
    own = [k for k in per_class.state_dict() if not k.startswith("projector.")]
    assert own == ["anchors", "semantic_anchors", "step", "gate_open_step", "class_open_step"]
    assert torch.equal(per_class.class_open_step, torch.full((C,), -1))
    text = repr(make_sar(gate="per_class", pull="l2_margin", margin=0.25))
    assert "gate='per_class'" in text and "margin=0.25" in text


def test_per_class_gate_opens_and_updates_each_class_on_its_own() -> None:
    torch.manual_seed(0)
    sar = per_class_sar([30.0, 30.0, 0.0, 0.0], ema_momentum=0.9)
    features, labels = flat_batch(40)
    labels = all_classes(features, labels)

    p1 = sar.projected_anchors().detach()
    out = sar(features, labels)  # step 1: classes 0 and 1 open
    assert out["gate_open"] is True
    assert out["gate_open_fraction"].dtype == torch.float32
    assert float(out["gate_open_fraction"]) == 0.5
    assert sar.class_open_step.tolist() == [1, 1, -1, -1] and int(sar.gate_open_step) == 1
    assert sar.gate_ever_opened and sar.classes_ready.tolist() == [True, True, False, False]
    assert torch.equal(sar.semantic_anchors[:2], p1[:2])
    assert torch.equal(sar.semantic_anchors[2:], torch.zeros(2, D))  # never touched
    expected = loop_pull(features, labels, p1, "l2", classes=[0, 1])
    torch.testing.assert_close(out["pull"], expected)
    # the pull over every class would differ: the unopened rows are zeros
    assert not torch.allclose(out["pull"], loop_pull(features, labels, sar.semantic_anchors, "l2"))

    nudge_projector(sar)
    sar.classifier.margins = torch.diag(torch.tensor([30.0, 30.0, 30.0, 0.0]))
    p2 = sar.projected_anchors().detach()
    assert not torch.allclose(p2, p1)
    out = sar(features, labels)  # step 2: class 2 opens with a copy, 0 and 1 move
    s2 = sar.semantic_anchors.clone()
    torch.testing.assert_close(s2[:2], 0.9 * p1[:2] + 0.1 * p2[:2], rtol=1e-6, atol=1e-6)
    assert torch.equal(s2[2], p2[2]) and torch.equal(s2[3], torch.zeros(D))
    assert sar.class_open_step.tolist() == [1, 1, 2, -1] and int(sar.gate_open_step) == 1
    assert float(out["gate_open_fraction"]) == 0.75
    torch.testing.assert_close(
        out["pull"], loop_pull(features, labels, s2, "l2", classes=[0, 1, 2])
    )

    nudge_projector(sar)
    sar.classifier.margins = torch.diag(torch.tensor([0.0, 30.0, 30.0, 0.0]))
    p3 = sar.projected_anchors().detach()
    out = sar(features, labels)  # step 3: class 0 fails; it stays ready and is still pulled
    assert torch.equal(sar.semantic_anchors[0], s2[0])
    torch.testing.assert_close(
        sar.semantic_anchors[1:3], 0.9 * s2[1:3] + 0.1 * p3[1:3], rtol=1e-6, atol=1e-6
    )
    assert torch.equal(sar.semantic_anchors[3], torch.zeros(D))
    assert sar.class_open_step.tolist() == [1, 1, 2, -1] and int(sar.step) == 3
    assert out["gate_open"] is True and float(out["gate_open_fraction"]) == 0.75
    expected = loop_pull(features, labels, sar.semantic_anchors, "l2", classes=[0, 1, 2])
    torch.testing.assert_close(out["pull"], expected)


@pytest.mark.parametrize("dense", [False, True])
def test_per_class_pull_ignores_positions_of_unopened_classes(dense: bool) -> None:
    torch.manual_seed(1)
    sar = per_class_sar([0.0, 30.0, 0.0, 30.0])
    features, labels = dense_batch() if dense else flat_batch(30)
    labels = all_classes(features, labels)
    features.requires_grad_()
    out = sar(features, labels)
    shut = (labels == 0) | (labels == 2)
    assert bool(shut.any()) and bool(((labels == 1) | (labels == 3)).any())
    (grad,) = torch.autograd.grad(out["pull"], features)
    channels_last = grad.permute(0, 2, 3, 1) if dense else grad
    assert torch.equal(channels_last[shut], torch.zeros_like(channels_last[shut]))
    assert float(channels_last[~shut & (labels != IGNORE)].abs().sum()) > 0

    moved = features.detach().clone()
    view = moved.permute(0, 2, 3, 1) if dense else moved
    view[shut] = 100 * torch.randn(int(shut.sum()), D)
    sar.eval()  # no state change: the same ready classes, the same S
    assert torch.equal(sar(moved, labels)["pull"], sar(features.detach(), labels)["pull"])


def test_per_class_gate_with_no_ready_class_gives_a_connected_zero() -> None:
    sar = per_class_sar([0.0, 0.0, 0.0, 0.0])
    features, labels = dense_batch()
    features.requires_grad_()
    out = sar(features, labels)
    assert out["gate_open"] is False and float(out["gate_open_fraction"]) == 0.0
    assert float(out["pull"].detach()) == 0.0 and not sar.gate_ever_opened
    assert int(sar.gate_open_step) == -1 and sar.class_open_step.tolist() == [-1] * C
    (grad,) = torch.autograd.grad(out["pull"], features)
    assert torch.equal(grad, torch.zeros_like(features))


def test_per_class_gate_with_only_unopened_classes_in_the_batch_gives_zero() -> None:
    sar = per_class_sar([30.0, 0.0, 0.0, 0.0])
    features, labels = flat_batch()
    labels[labels == 0] = 1
    features.requires_grad_()
    out = sar(features, labels)
    assert out["gate_open"] is True and float(out["gate_open_fraction"]) == 0.25
    assert float(out["pull"].detach()) == 0.0
    (grad,) = torch.autograd.grad(out["pull"], features)
    assert torch.equal(grad, torch.zeros_like(features))


@pytest.mark.parametrize("dense", [False, True])
def test_per_class_gate_equals_the_release_gate_when_every_anchor_passes(dense: bool) -> None:
    torch.manual_seed(2)
    features, labels = dense_batch() if dense else flat_batch()
    released = make_sar(ema_momentum=0.7)
    per_class = make_sar(
        ema_momentum=0.7, gate="per_class", projector=copy.deepcopy(released.projector)
    )
    per_class.classifier.weight_matrix = released.classifier.weight_matrix
    for _ in range(3):
        a, b = released(features, labels), per_class(features, labels)
        assert torch.equal(released.semantic_anchors, per_class.semantic_anchors)
        for key in ("loss", "aux_ce", "pull", "gate_open_fraction"):
            assert torch.equal(a[key], b[key]), key
        assert a["gate_open"] is b["gate_open"] is True
        noise = 0.3 * torch.randn(D, D)
        for sar in (released, per_class):
            with torch.no_grad():
                sar.projector.weight.add_(noise)
    assert int(per_class.gate_open_step) == int(released.gate_open_step) == 1
    assert per_class.class_open_step.tolist() == [1] * C


def test_gate_open_fraction_of_the_release_gate() -> None:
    sar = make_sar()
    sar.classifier.margins = torch.zeros(C, C)
    features, labels = flat_batch()
    out = sar(features, labels)
    assert out["gate_open"] is False and out["gate_open_fraction"].dtype == torch.float32
    assert float(out["gate_open_fraction"]) == 0.0
    assert sar.classes_ready.tolist() == [False] * C
    sar.classifier.margins = 30.0 * torch.eye(C)
    out = sar(features, labels)
    assert out["gate_open"] is True and float(out["gate_open_fraction"]) == 1.0
    sar.classifier.margins = torch.diag(torch.tensor([30.0, 30.0, 30.0, 0.0]))
    out = sar(features, labels)  # the gate fails again, but S exists for every class
    assert out["gate_open"] is False and float(out["gate_open_fraction"]) == 1.0
    assert float(out["pull"].detach()) == 0.0
    assert sar.classes_ready.tolist() == [True] * C
    assert float(sar.eval()(features, labels)["gate_open_fraction"]) == 1.0


def test_per_class_reference_points_wait_for_every_class() -> None:
    sar = per_class_sar([30.0, 30.0, 30.0, 0.0])
    features, labels = flat_batch()
    sar(features, labels)
    assert sar.gate_ever_opened and sar.reference_points() is None
    sar.classifier.margins = 30.0 * torch.eye(C)
    sar(features, labels)
    name, points = sar.reference_points()
    assert name == "semantic anchors" and torch.equal(points, sar.semantic_anchors)
    assert sar.class_open_step.tolist() == [1, 1, 1, 2]


def test_per_class_eval_pulls_ready_classes_without_changing_state() -> None:
    torch.manual_seed(3)
    sar = per_class_sar([30.0, 0.0, 30.0, 0.0])
    features, labels = dense_batch()
    labels = all_classes(features, labels)
    sar(features, labels)
    sar.eval()
    sar.classifier.margins = 30.0 * torch.eye(C)  # would open every class in training
    before = {k: v.clone() for k, v in sar.state_dict().items()}
    out = sar(features, labels)
    after = sar.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert out["gate_open"] is False and float(out["gate_open_fraction"]) == 0.5
    expected = loop_pull(features, labels, sar.semantic_anchors, "l2", classes=[0, 2])
    assert float(expected.detach()) > 0
    torch.testing.assert_close(out["pull"], expected)


def test_per_class_state_dict_round_trip() -> None:
    torch.manual_seed(4)
    sar = per_class_sar([30.0, 0.0, 30.0, 0.0], ema_momentum=0.5)
    features, labels = dense_batch()
    labels = all_classes(features, labels)
    sar(features, labels)
    nudge_projector(sar)
    sar.classifier.margins = torch.diag(torch.tensor([30.0, 30.0, 0.0, 0.0]))
    sar(features, labels)
    assert sar.class_open_step.tolist() == [1, 2, 1, -1]
    state = sar.state_dict()

    fresh = make_sar(gate="per_class", ema_momentum=0.5, seed=1)
    fresh.classifier.margins = sar.classifier.margins
    fresh.classifier.weight_matrix = sar.classifier.weight_matrix
    fresh.load_state_dict(state)
    assert fresh.class_open_step.tolist() == [1, 2, 1, -1] and int(fresh.gate_open_step) == 1
    assert torch.equal(fresh.semantic_anchors, sar.semantic_anchors)
    for train in (False, True):
        sar.train(train)
        fresh.train(train)
        a, b = sar(features, labels), fresh(features, labels)
        for key in ("loss", "aux_ce", "pull", "gate_open_fraction"):
            assert torch.equal(a[key], b[key]), key
    assert torch.equal(fresh.class_open_step, sar.class_open_step)
    with pytest.raises(RuntimeError, match="class_open_step"):
        make_sar().load_state_dict(state)  # a release-gated module has no per-class state


def test_per_class_gate_warns_once_naming_the_shut_classes() -> None:
    import warnings

    sar = per_class_sar([30.0, 30.0, 0.0, 0.0], gate_warn_steps=2)
    features, labels = flat_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sar(features, labels)
    with pytest.warns(RuntimeWarning, match=r"not opened for 2 of 4 classes after 2 steps") as rec:
        sar(features, labels)
    message = str(rec[0].message)
    assert "2 (p=" in message and "3 (p=" in message and "0 (p=" not in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sar(features, labels)
    quiet = per_class_sar([30.0] * C, gate_warn_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet(features, labels)
        quiet(features, labels)


# --- pull="l2_margin" ----------------------------------------------------------------------


def median_distance(features, labels, anchors) -> float:
    """A margin with about half the valid positions of the batch within it."""
    values = [
        float(((f - anchors[y]) ** 2).sum() / D)
        for f, y in positions(features, labels)
        if y != IGNORE
    ]
    # halfway between two distances: no position sits on the hinge's kink
    ordered = sorted(values)
    middle = len(ordered) // 2
    return (ordered[middle - 1] + ordered[middle]) / 2


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dense", [False, True])
def test_margin_pull_matches_a_hand_hinge(dense: bool, weighted: bool) -> None:
    torch.manual_seed(5)
    anchors = torch.randn(C, D)
    features, labels = dense_batch() if dense else flat_batch(30)
    weights = torch.tensor([0.5, 2.0, 0.0, 1.5]) if weighted else None
    margin = median_distance(features, labels, anchors)  # about half the positions inside
    features.requires_grad_()
    pull = _masked_pull(
        features, labels, anchors, IGNORE, kind="l2_margin", class_weights=weights, margin=margin
    )
    expected = loop_pull(features, labels, anchors, "l2_margin", weights, margin=margin)
    torch.testing.assert_close(pull, expected)
    plain = _masked_pull(features, labels, anchors, IGNORE, class_weights=weights)
    assert 0 < float(pull.detach()) < float(plain.detach()) - 0.5 * margin
    (grad,) = torch.autograd.grad(pull, features)
    (expected_grad,) = torch.autograd.grad(expected, features)
    torch.testing.assert_close(grad, expected_grad)
    # the positions within the margin are not pulled
    channels_last = grad.permute(0, 2, 3, 1) if dense else grad
    feats = features.detach().permute(0, 2, 3, 1) if dense else features.detach()
    safe = torch.where(labels == IGNORE, 0, labels)
    inside = ((feats - anchors[safe]) ** 2).sum(-1) / D <= margin
    inside &= labels != IGNORE
    assert bool(inside.any())
    assert torch.equal(channels_last[inside], torch.zeros_like(channels_last[inside]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dense", [False, True])
def test_zero_margin_is_exactly_the_l2_pull(dense: bool, dtype: torch.dtype) -> None:
    torch.manual_seed(6)
    anchors = torch.randn(C, D, dtype=dtype)
    features, labels = dense_batch(dtype=dtype) if dense else flat_batch(dtype=dtype)
    features.requires_grad_()
    hinge = _masked_pull(features, labels, anchors, IGNORE, kind="l2_margin", margin=0.0)
    plain = _masked_pull(features, labels, anchors, IGNORE, kind="l2")
    assert torch.equal(hinge, plain)
    (g1,) = torch.autograd.grad(hinge, features)
    (g2,) = torch.autograd.grad(plain, features)
    assert torch.equal(g1, g2)
    sar_plain = make_sar().to(dtype)
    sar_hinge = make_sar(pull="l2_margin", projector=copy.deepcopy(sar_plain.projector))
    sar_hinge = sar_hinge.to(dtype)
    sar_hinge.classifier.weight_matrix = sar_plain.classifier.weight_matrix
    a, b = sar_hinge(features, labels), sar_plain(features, labels)
    assert float(a["pull"].detach()) > 0
    for key in ("loss", "aux_ce", "pull"):
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("dense", [False, True])
def test_margin_pull_gives_no_gradient_to_the_anchors(dense: bool) -> None:
    anchors = torch.randn(C, D, requires_grad=True)
    features, labels = dense_batch() if dense else flat_batch()
    features.requires_grad_()
    pull = _masked_pull(features, labels, anchors, IGNORE, kind="l2_margin", margin=0.5)
    assert float(pull.detach()) > 0
    grads = torch.autograd.grad(pull, [features, anchors], allow_unused=True)
    assert grads[0] is not None and float(grads[0].abs().sum()) > 0 and grads[1] is None


@pytest.mark.parametrize("gate", ["all", "per_class"])
@pytest.mark.parametrize("dense", [False, True])
def test_module_margin_pull_uses_the_semantic_anchors(dense: bool, gate: str) -> None:
    torch.manual_seed(7)
    features, labels = dense_batch() if dense else flat_batch(30)
    probe = make_sar()
    margin = median_distance(features, labels, probe.projected_anchors().detach())
    sar = make_sar(pull="l2_margin", margin=margin, gate=gate, projector=probe.projector)
    features.requires_grad_()
    out = sar(features, labels)
    assert out["gate_open"] is True and not sar.semantic_anchors.requires_grad
    expected = loop_pull(features, labels, sar.semantic_anchors, "l2_margin", margin=margin)
    assert float(expected.detach()) > 0
    torch.testing.assert_close(out["pull"], expected)
    torch.testing.assert_close(out["loss"], out["aux_ce"] + 0.1 * expected)
    grads = torch.autograd.grad(out["loss"], [features, *sar.projector.parameters()])
    (expected_grad,) = torch.autograd.grad(0.1 * expected, features)
    torch.testing.assert_close(grads[0], expected_grad)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"margin": 0.5}, ValueError, r"margin=0.5 needs pull='l2_margin', got pull='l2'"),
        (
            {"margin": 0.5, "pull": "cosine"},
            ValueError,
            r"margin=0.5 needs pull='l2_margin', got pull='cosine'",
        ),
        ({"margin": -0.1, "pull": "l2_margin"}, ValueError, r"margin must be finite and >= 0"),
        ({"margin": math.inf, "pull": "l2_margin"}, ValueError, r"margin must be finite"),
        ({"margin": "1", "pull": "l2_margin"}, TypeError, r"margin must be a real number"),
        ({"gate": "some"}, ValueError, r"gate must be one of 'all', 'per_class', got 'some'"),
        ({"gate": None}, TypeError, r"gate must be one of 'all', 'per_class', got NoneType"),
    ],
)
def test_bad_gate_and_margin_raise(kwargs, error, pattern) -> None:
    with pytest.raises(error, match=pattern):
        make_sar(**kwargs)


def test_gate_and_margin_come_from_a_config() -> None:
    assert {"gate", "margin"} <= set(loss_parameters("sar"))
    objective = objective_from({"gate": "per_class", "pull": "l2_margin", "margin": 0.5})
    sar = objective.terms[1]
    assert sar.gate == "per_class" and sar.pull == "l2_margin" and sar.margin == 0.5
    assert "class_open_step" in sar.state_dict()
    default = objective_from({}).terms[1]
    assert default.gate == "all" and default.margin == 0.0


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"gate": "any"}, r"loss sar: gate must be one of 'all', 'per_class', got 'any'"),
        ({"margin": 0.5}, r"loss sar: margin=0.5 needs pull='l2_margin', got pull='l2'"),
        ({"pull": "l2_margin", "margin": -1}, r"loss sar: margin must be finite and >= 0"),
    ],
)
def test_bad_gate_and_margin_from_a_config_are_config_errors(params: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        objective_from(params)


@pytest.mark.parametrize("gate", ["all", "per_class"])
def test_objective_reports_the_gate_open_fraction(gate: str) -> None:
    torch.manual_seed(8)
    objective = objective_from({"gate": gate, "seed": 0})
    logits, features = torch.randn(12, 10), torch.randn(12, 16)
    labels = torch.randint(0, 10, (12,))
    out = objective(logits, features, labels)
    assert {"sar/gate_open", "sar/gate_open_fraction", "sar/pull", "sar/aux_ce"} <= set(out)
    fraction = out["sar/gate_open_fraction"]
    assert fraction.dtype == torch.float32 and fraction.shape == ()
    # a fresh classifier classifies no anchor confidently: nothing has opened yet
    assert float(fraction) == 0.0 and float(out["sar/gate_open"]) == 0.0
    sar = objective.terms[1]
    with torch.no_grad():  # now every anchor is confidently its own class
        projected = sar.projected_anchors()
        objective_model_weight = 30.0 * torch.linalg.pinv(projected).T
        sar.classifier.weight.copy_(objective_model_weight)
        sar.classifier.bias.zero_()
    out = objective(logits, features, labels)
    assert float(out["sar/gate_open_fraction"]) == 1.0 and float(out["sar/gate_open"]) == 1.0
