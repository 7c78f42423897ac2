"""SemanticAnchorRegularizer's options: anchor_init, pull and class_weights, the
class_balanced_weights helper, and the point sets of anchorlearn._geometry behind them."""

from __future__ import annotations

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


def loop_pull(features, labels, anchors, kind: str, weights=None) -> torch.Tensor:
    """``sum w[y] d / sum w[y]`` over the valid positions, one position at a time."""
    total, weight_sum = features.new_zeros(()), 0.0
    for f, y in positions(features, labels):
        if y == IGNORE:
            continue
        a = anchors[y].to(f.dtype)
        if kind == "l2":
            d = ((f - a) ** 2).sum() / f.numel()
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
    assert set(out) == {"loss", "aux_ce", "pull", "gate_open"}


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
        ({"pull": "L2"}, ValueError, r"pull must be one of 'l2', 'cosine', got 'L2'"),
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


def objective_from(sar_params: dict):
    raw = digits_config(losses=["ce", {"name": "sar", **sar_params}])
    specs = parse_config(raw).losses
    return build_objective(specs, model=StubModel(), num_classes=10, class_counts=None)


def test_string_options_come_from_a_config() -> None:
    assert {"anchor_init", "pull"} <= set(loss_parameters("sar"))
    assert "class_weights" not in loss_parameters("sar")  # a tensor: set in Python only
    objective = objective_from({"anchor_init": "etf", "pull": "cosine", "seed": 0})
    sar = objective.terms[1]
    assert sar.anchor_init == "etf" and sar.pull == "cosine"
    torch.testing.assert_close(sar.anchors, math.sqrt(16) * simplex_etf(16, 10, seed=0).T.float())


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"anchor_init": "sphere"}, r"loss sar: anchor_init must be one of"),
        ({"pull": "l1"}, r"loss sar: pull must be one of"),
        # a tensor cannot come from YAML: class_weights is set in Python only
        ({"class_weights": [1.0] * 10}, r"class_weights"),
    ],
)
def test_bad_options_from_a_config_are_config_errors(params: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        objective_from(params)
