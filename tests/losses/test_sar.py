"""Tests of SemanticAnchorRegularizer against a straightforward reference of the release."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from anchorlearn.losses.sar import SemanticAnchorRegularizer, _masked_pull

C, D = 4, 16
IGNORE = 255
HYPOTHESIS = settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


# --- reference ---------------------------------------------------------------------------


def reference_aux(logits: torch.Tensor, filter_conf: float) -> torch.Tensor:
    """The release's hard-anchor weighted CE, one anchor at a time."""
    num = logits.shape[0]
    onehot = torch.eye(num, dtype=logits.dtype)
    probs = torch.softmax(logits, dim=1)
    ce = -(onehot * torch.log(probs)).sum(dim=1)
    own = []
    for i in range(num):
        p_i = (probs[i] * onehot[i]).sum()
        own.append(torch.ones_like(p_i) if p_i > filter_conf else p_i)
    log_p = [torch.log(p_i) for p_i in own]
    denom = sum(log_p) + 1e-9
    return sum(log_p[i] / denom * ce[i] for i in range(num))


def reference_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()


def reference_pull(
    features: torch.Tensor, labels: torch.Tensor, semantic: torch.Tensor, ignore_index: int = IGNORE
) -> torch.Tensor:
    """The release's dense pull: one-hot map, einsum target, masked squared error / D."""
    num, dim = semantic.shape
    if features.ndim == 4:
        labels = reference_labels(labels, tuple(features.shape[2:]))
    valid = labels != ignore_index
    onehot = F.one_hot(torch.where(valid, labels, 0), num).to(features.dtype)
    onehot = onehot * valid[..., None].to(features.dtype)
    if features.ndim == 4:
        target = torch.einsum("bhwc,cd->bdhw", onehot, semantic.to(features.dtype))
    else:
        target = onehot @ semantic.to(features.dtype)
    squared = ((features - target) ** 2).sum(dim=1) * valid
    return squared.sum() / (valid.sum().clamp_min(1) * dim)


# --- helpers -----------------------------------------------------------------------------


class SwitchClassifier:
    """A plain callable: ``P @ W.T + margins``; ``margins`` decides which anchors pass."""

    def __init__(self, margins: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
        self.weight_matrix = (0.01 * torch.randn(C, D)).to(dtype).requires_grad_()
        self.margins = margins.to(dtype)

    def __call__(self, projected: torch.Tensor) -> torch.Tensor:
        return projected @ self.weight_matrix.to(projected.dtype).T + self.margins


def open_margins(scale: float = 30.0) -> torch.Tensor:
    return scale * torch.eye(C)


def shut_margins() -> torch.Tensor:
    return torch.zeros(C, C)


def make_sar(classifier, projector: nn.Module | None = None, **kwargs) -> SemanticAnchorRegularizer:
    if projector is None:
        projector = nn.Linear(D, D)
    return SemanticAnchorRegularizer(C, D, classifier, projector=projector, seed=0, **kwargs)


def dense_batch(b: int = 2, h: int = 5, w: int = 6, label_size: tuple[int, int] | None = None):
    features = torch.randn(b, D, h, w)
    lh, lw = label_size or (h, w)
    labels = torch.randint(0, C, (b, lh, lw))
    labels[:, 0, :2] = IGNORE
    return features, labels


def flat_batch(n: int = 12):
    features = torch.randn(n, D)
    labels = torch.randint(0, C, (n,))
    labels[:2] = IGNORE
    return features, labels


def state_snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --- values against the reference --------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dense", [False, True])
def test_first_open_step_matches_reference(dtype: torch.dtype, dense: bool) -> None:
    margins = torch.eye(C) * torch.tensor([30.0, 30.0, 3.0, 2.5])
    classifier = SwitchClassifier(margins, dtype)
    sar = make_sar(classifier, update_conf=0.5).to(dtype)
    features, labels = dense_batch(label_size=(10, 12)) if dense else flat_batch()
    features = features.to(dtype).requires_grad_()

    projected = sar.projected_anchors().detach()
    logits = classifier(projected)
    out = sar(features, labels)

    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 0}
    assert out["gate_open"] is True
    assert out["aux_ce"].dtype == dtype and out["pull"].dtype == dtype
    expected_aux = reference_aux(logits, sar.filter_conf)
    expected_pull = reference_pull(features, labels, projected)
    assert float(expected_aux.detach()) > 0.1
    torch.testing.assert_close(out["aux_ce"], expected_aux, **tol)
    torch.testing.assert_close(out["pull"], expected_pull, **tol)
    torch.testing.assert_close(out["loss"], expected_aux + 0.1 * expected_pull, **tol)

    (grad,) = torch.autograd.grad(out["pull"], features)
    (expected_grad,) = torch.autograd.grad(expected_pull, features)
    torch.testing.assert_close(grad, expected_grad, **tol)


@pytest.mark.parametrize("dense", [False, True])
def test_bf16_autocast_matches_float32_reference(dense: bool) -> None:
    """Under CPU bf16 autocast: within rtol 3e-2 / atol 1e-2 of the float32 reference."""
    margins = torch.eye(C) * torch.tensor([30.0, 3.0, 3.0, 2.5])
    classifier = SwitchClassifier(margins)
    sar = make_sar(classifier, update_conf=0.5)
    features, labels = dense_batch(label_size=(10, 12)) if dense else flat_batch()
    features.requires_grad_()

    projected = sar.projected_anchors().detach()
    expected_aux = reference_aux(classifier(projected), sar.filter_conf)
    expected_pull = reference_pull(features, labels, projected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sar(features.to(torch.bfloat16), labels)
    assert out["gate_open"] is True
    assert out["pull"].dtype == torch.float32 and out["aux_ce"].dtype == torch.float32
    torch.testing.assert_close(out["aux_ce"], expected_aux, rtol=3e-2, atol=1e-2)
    torch.testing.assert_close(out["pull"], expected_pull, rtol=3e-2, atol=1e-2)
    out["loss"].backward()
    assert features.grad is not None and bool(torch.isfinite(features.grad).all())
    assert float(features.grad.abs().sum()) > 0


# --- gradient routing --------------------------------------------------------------------


def test_gradient_routing_per_term() -> None:
    classifier = nn.Linear(D, C)
    sar = SemanticAnchorRegularizer(
        C, D, classifier, seed=0, update_conf=0.8, filter_conf=0.99
    )  # default projector: Linear-BN-ReLU x3
    with torch.no_grad():
        projected = sar.projected_anchors()
        # logits = 4 * I exactly: p_i = e^4 / (e^4 + 3) ~ 0.95, inside (update_conf, filter_conf).
        classifier.weight.copy_(4.0 * torch.linalg.pinv(projected).T)
        classifier.bias.zero_()
    features, labels = dense_batch()
    features.requires_grad_()
    out = sar(features, labels)
    assert (
        out["gate_open"] is True
        and float(out["aux_ce"].detach()) > 0
        and float(out["pull"].detach()) > 0
    )

    projector_params = list(sar.projector.parameters())
    classifier_params = list(classifier.parameters())
    inputs = [features, *projector_params, *classifier_params]

    def nonzero(g: torch.Tensor | None) -> bool:
        return g is not None and float(g.abs().sum()) > 0

    pull_grads = torch.autograd.grad(out["pull"], inputs, allow_unused=True, retain_graph=True)
    assert nonzero(pull_grads[0])
    assert not any(nonzero(g) for g in pull_grads[1:])

    aux_grads = torch.autograd.grad(out["aux_ce"], inputs, allow_unused=True)
    assert not nonzero(aux_grads[0])
    assert any(nonzero(g) for g in aux_grads[1 : 1 + len(projector_params)])
    assert all(nonzero(g) for g in aux_grads[1 + len(projector_params) :])

    buffers = dict(sar.named_buffers())
    for name in ("anchors", "semantic_anchors"):
        assert name in buffers and not buffers[name].requires_grad
        assert all(p is not buffers[name] for p in sar.parameters())
    assert "classifier" not in dict(sar.named_modules())


# --- gate and EMA ------------------------------------------------------------------------


def test_gate_and_ema_over_steps() -> None:
    classifier = SwitchClassifier(shut_margins())
    sar = make_sar(classifier, ema_momentum=0.9)
    features, labels = dense_batch()

    out = sar(features, labels)  # step 1: shut
    assert out["gate_open"] is False and "pull" in out
    assert float(out["pull"].detach()) == 0.0
    assert int(sar.step) == 1 and int(sar.gate_open_step) == -1 and not sar.gate_ever_opened
    assert torch.equal(sar.semantic_anchors, torch.zeros(C, D))
    assert sar.reference_points() is None  # no semantic anchors yet

    classifier.margins = open_margins()
    p2 = sar.projected_anchors().detach()
    out = sar(features, labels)  # step 2: first opening copies P
    assert out["gate_open"] is True
    assert torch.equal(sar.semantic_anchors, p2)
    assert int(sar.gate_open_step) == 2 and int(sar.step) == 2
    name, points = sar.reference_points()
    assert name == "semantic anchors" and torch.equal(points, p2)
    points.zero_()
    assert torch.equal(sar.semantic_anchors, p2)  # a copy, not the buffer
    torch.testing.assert_close(out["pull"], reference_pull(features, labels, p2))

    expected = p2
    for step in (3, 4):
        with torch.no_grad():
            sar.projector.weight.add_(0.3 * torch.randn(D, D))
        p = sar.projected_anchors().detach()
        assert not torch.allclose(p, expected)
        out = sar(features, labels)
        expected = 0.9 * expected + 0.1 * p
        assert out["gate_open"] is True and int(sar.step) == step
        assert int(sar.gate_open_step) == 2
        torch.testing.assert_close(sar.semantic_anchors, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out["pull"], reference_pull(features, labels, expected))

    classifier.margins = shut_margins()
    before = sar.semantic_anchors.clone()
    out = sar(features, labels)  # step 5: shut again
    assert out["gate_open"] is False and float(out["pull"].detach()) == 0.0
    assert torch.equal(sar.semantic_anchors, before) and int(sar.step) == 5


def test_gate_needs_every_anchor_argmax_correct() -> None:
    margins = open_margins()
    margins[0, 1] = 40.0  # anchor 0 is classified as class 1
    classifier = SwitchClassifier(margins)
    sar = make_sar(classifier, update_conf=0.0)
    out = sar(*flat_batch())
    assert out["gate_open"] is False and not sar.gate_ever_opened
    classifier.margins = open_margins()
    assert sar(*flat_batch())["gate_open"] is True


def test_eval_mode_changes_no_state() -> None:
    classifier = SwitchClassifier(open_margins())
    sar = SemanticAnchorRegularizer(C, D, classifier, seed=0)  # default projector with BN
    features, labels = dense_batch()
    sar(features, labels)
    sar(features, labels)
    assert int(sar.step) == 2 and sar.gate_ever_opened

    sar.eval()
    before = state_snapshot(sar)
    out = sar(features, labels)
    assert out["gate_open"] is False
    assert_state_equal(state_snapshot(sar), before)
    torch.testing.assert_close(out["pull"], reference_pull(features, labels, sar.semantic_anchors))
    assert float(out["pull"].detach()) > 0

    sar.train()
    sar(features, labels)
    assert int(sar.step) == 3


def test_eval_before_gate_ever_opened_gives_zero_pull() -> None:
    sar = make_sar(SwitchClassifier(open_margins())).eval()
    features, labels = flat_batch()
    out = sar(features, labels)
    assert float(out["pull"].detach()) == 0.0 and int(sar.step) == 0 and not sar.gate_ever_opened


# --- hard-anchor weighting ---------------------------------------------------------------


def test_all_confident_anchors_give_exactly_zero_aux() -> None:
    classifier = SwitchClassifier(open_margins(40.0))
    sar = make_sar(classifier)
    out = sar(*flat_batch())
    assert float(out["aux_ce"].detach()) == 0.0
    (grad,) = torch.autograd.grad(out["aux_ce"], classifier.weight_matrix, allow_unused=True)
    assert grad is None or float(grad.abs().sum()) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_partially_confident_aux_matches_reference(dtype: torch.dtype) -> None:
    margins = torch.eye(C) * torch.tensor([20.0, 0.5, 1.0, 20.0])
    classifier = SwitchClassifier(margins, dtype)
    sar = make_sar(classifier).to(dtype)
    projected = sar.projected_anchors()
    logits = classifier(projected)
    probs = torch.softmax(logits, dim=1).diagonal()
    assert bool((probs > 0.9).any()) and bool((probs <= 0.9).any())

    out = sar(*flat_batch())
    expected = reference_aux(logits, 0.9)
    torch.testing.assert_close(out["aux_ce"], expected)
    unsolved = probs <= 0.9
    ce = -torch.log(probs[unsolved])
    torch.testing.assert_close(out["aux_ce"], (ce**2).sum() / ce.sum())

    grads = torch.autograd.grad(out["aux_ce"], classifier.weight_matrix)
    (expected_grads,) = torch.autograd.grad(expected, classifier.weight_matrix)
    torch.testing.assert_close(grads[0], expected_grads)


# --- ignore_index and label resizing -----------------------------------------------------


@pytest.mark.parametrize("dense", [False, True])
def test_all_ignored_batch_gives_finite_zero_pull(dense: bool) -> None:
    sar = make_sar(SwitchClassifier(open_margins()))
    features, labels = dense_batch() if dense else flat_batch()
    labels = torch.full_like(labels, IGNORE)
    features.requires_grad_()
    out = sar(features, labels)
    assert out["gate_open"] is True
    assert float(out["pull"].detach()) == 0.0 and bool(torch.isfinite(out["loss"]))
    out["loss"].backward()
    assert features.grad is not None
    assert torch.equal(features.grad, torch.zeros_like(features))


def test_ignore_index_none_pulls_every_position() -> None:
    sar = make_sar(SwitchClassifier(open_margins()), ignore_index=None)
    features, labels = dense_batch()
    labels[labels == IGNORE] = 0
    projected = sar.projected_anchors().detach()
    out = sar(features, labels)
    torch.testing.assert_close(out["pull"], reference_pull(features, labels, projected))
    with pytest.raises(ValueError, match="labels"):
        sar(features, torch.full_like(labels, IGNORE))


def test_custom_ignore_index_in_dense_labels() -> None:
    sar = make_sar(SwitchClassifier(open_margins()), ignore_index=-1)
    features, labels = dense_batch()
    labels[1, 2:, :] = -1
    labels[labels == IGNORE] = -1
    projected = sar.projected_anchors().detach()
    out = sar(features, labels)
    expected = reference_pull(features, labels, projected, ignore_index=-1)
    torch.testing.assert_close(out["pull"], expected)
    everything = reference_pull(features, labels.clamp_min(0), projected, ignore_index=-1)
    assert not torch.allclose(expected, everything)
    with pytest.raises(ValueError, match="labels"):
        sar(features, torch.full_like(labels, IGNORE))


@HYPOTHESIS
@given(
    b=st.integers(1, 3),
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    lh=st.integers(1, 13),
    lw=st.integers(1, 13),
    seed=st.integers(0, 2**16),
)
def test_label_resizing_is_nearest(b: int, h: int, w: int, lh: int, lw: int, seed: int) -> None:
    torch.manual_seed(seed)
    sar = make_sar(SwitchClassifier(open_margins()))
    features = torch.randn(b, D, h, w)
    labels = torch.randint(0, C, (b, lh, lw))
    labels[torch.rand(b, lh, lw) < 0.2] = IGNORE
    projected = sar.projected_anchors().detach()
    out = sar(features, labels)
    torch.testing.assert_close(out["pull"], reference_pull(features, labels, projected))


# --- classifier kinds --------------------------------------------------------------------


def test_linear_conv_and_callable_classifiers_agree() -> None:
    linear = nn.Linear(D, C)
    first = SemanticAnchorRegularizer(C, D, linear, seed=3)
    projector = copy.deepcopy(first.projector)
    with torch.no_grad():
        # logits = 4 * I + noise: the gate opens and the aux CE stays active.
        linear.weight.copy_(4.0 * torch.linalg.pinv(first.projected_anchors()).T)
        linear.weight.add_(0.01 * torch.randn(C, D))
        linear.bias.normal_(0, 0.1)
    conv = nn.Conv2d(D, C, 1)
    with torch.no_grad():
        conv.weight.copy_(linear.weight[:, :, None, None])
        conv.bias.copy_(linear.bias)
    weight, bias = linear.weight.detach().clone(), linear.bias.detach().clone()

    def plain(projected: torch.Tensor) -> torch.Tensor:
        return projected @ weight.T + bias

    features, labels = dense_batch()
    outs = []
    for classifier in (linear, conv, plain):
        sar = SemanticAnchorRegularizer(
            C, D, classifier, projector=copy.deepcopy(projector), seed=3, filter_conf=0.99
        )
        outs.append(sar(features, labels))
    assert outs[0]["gate_open"] is True
    assert float(outs[0]["aux_ce"].detach()) > 0 and float(outs[0]["pull"].detach()) > 0
    for out in outs[1:]:
        assert out["gate_open"] is True
        for key in ("loss", "aux_ce", "pull"):
            torch.testing.assert_close(out[key], outs[0][key], rtol=1e-6, atol=1e-6)


# --- state_dict and dtype ----------------------------------------------------------------


def test_state_dict_round_trip_gives_identical_outputs() -> None:
    classifier = SwitchClassifier(open_margins())
    sar = SemanticAnchorRegularizer(C, D, classifier, seed=0, ema_momentum=0.5)
    features, labels = dense_batch()
    for _ in range(3):
        sar(features, labels)
    state = sar.state_dict()
    for key in ("anchors", "semantic_anchors", "step", "gate_open_step"):
        assert key in state
    assert any(k.endswith("running_mean") for k in state)
    assert any(k.endswith("num_batches_tracked") for k in state)

    fresh = SemanticAnchorRegularizer(C, D, classifier, seed=1, ema_momentum=0.5)
    assert not torch.equal(fresh.anchors, sar.anchors)
    fresh.load_state_dict(state)
    assert_state_equal(state_snapshot(fresh), state_snapshot(sar))
    for train in (False, True):
        sar.train(train)
        fresh.train(train)
        a, b = sar(features, labels), fresh(features, labels)
        for key in ("loss", "aux_ce", "pull"):
            assert torch.equal(a[key], b[key]), key
    assert_state_equal(state_snapshot(fresh), state_snapshot(sar))


def test_to_float64_with_float64_classifier() -> None:
    classifier = nn.Linear(D, C)
    sar = SemanticAnchorRegularizer(C, D, classifier, seed=0, update_conf=0.0)
    features, labels = dense_batch()
    out32 = sar(features, labels)
    sar.projector.zero_grad()

    sar64 = copy.deepcopy(sar).to(torch.float64)
    sar64.__dict__["classifier"] = copy.deepcopy(classifier).to(torch.float64)
    sar64.step.zero_()
    sar64.gate_open_step.fill_(-1)
    assert sar64.anchors.dtype == torch.float64 and sar64.step.dtype == torch.long
    out64 = sar64(features.double(), labels)
    for key in ("loss", "aux_ce", "pull"):
        assert out64[key].dtype == torch.float64
        torch.testing.assert_close(out64[key].float(), out32[key], rtol=1e-4, atol=1e-5)
    assert sar64.semantic_anchors.dtype == torch.float64


# --- gate-shut warning -------------------------------------------------------------------


def test_gate_shut_warning_fires_once_after_warn_steps() -> None:
    margins = torch.eye(C) * torch.tensor([30.0, 30.0, 0.0, 0.0])
    sar = make_sar(SwitchClassifier(margins), gate_warn_steps=3)
    features, labels = flat_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sar(features, labels)
        sar(features, labels)
    with pytest.warns(RuntimeWarning, match="not opened after 3 steps") as record:
        sar(features, labels)
    message = str(record[0].message)
    assert "2 (p=" in message and "3 (p=" in message
    assert "0 (p=" not in message and "1 (p=" not in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sar(features, labels)
        sar(features, labels)
    assert int(sar.step) == 5


def test_no_gate_warning_once_the_gate_has_opened() -> None:
    classifier = SwitchClassifier(open_margins())
    sar = make_sar(classifier, gate_warn_steps=2)
    features, labels = flat_batch()
    sar(features, labels)
    classifier.margins = shut_margins()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            sar(features, labels)
    assert int(sar.step) == 4


# --- bad input ---------------------------------------------------------------------------


@HYPOTHESIS
@given(
    shape=st.lists(st.integers(1, 3), min_size=0, max_size=5).filter(lambda s: len(s) not in (2, 4))
)
def test_wrong_feature_ndim_raises(shape: list[int]) -> None:
    sar = make_sar(SwitchClassifier(open_margins()))
    features = torch.randn(tuple(shape))
    with pytest.raises(ValueError, match=rf"features must be 2-D .* got {len(shape)}-D"):
        sar(features, torch.zeros(shape[:1], dtype=torch.long))


@HYPOTHESIS
@given(dim=st.integers(1, 40).filter(lambda d: d != D), dense=st.booleans())
def test_feature_dim_mismatch_raises(dim: int, dense: bool) -> None:
    sar = make_sar(SwitchClassifier(open_margins()))
    features = torch.randn(2, dim, 3, 3) if dense else torch.randn(5, dim)
    labels = torch.zeros((2, 3, 3) if dense else (5,), dtype=torch.long)
    with pytest.raises(ValueError, match=rf"features must have feat_dim={D}.*got shape"):
        sar(features, labels)


@HYPOTHESIS
@given(bad=st.one_of(st.integers(-1000, -1), st.integers(C, 254), st.integers(256, 10**6)))
def test_labels_out_of_range_raise(bad: int) -> None:
    sar = make_sar(SwitchClassifier(open_margins()))
    features, labels = flat_batch()
    labels[3] = bad
    with pytest.raises(ValueError, match=rf"labels must lie in \[0, {C}\) or ignore_index.*{bad}"):
        sar(features, labels)


@pytest.mark.parametrize(
    ("features", "labels", "error", "pattern"),
    [
        (torch.randn(5, D), torch.zeros(5), TypeError, r"labels must be an integer.*float32"),
        (torch.randn(5, D), torch.zeros(5, dtype=torch.bool), TypeError, r"labels.*bool"),
        (torch.zeros(5, D, dtype=torch.long), torch.zeros(5).long(), TypeError, r"features.*int64"),
        (
            torch.randn(5, D),
            torch.zeros(4, dtype=torch.long),
            ValueError,
            r"labels.*\(5,\).*\(4,\)",
        ),
        (torch.randn(2, D, 3, 3), torch.zeros(3, 3).long(), ValueError, r"labels.*\(2, H, W\)"),
        (torch.randn(5, D), [0, 1, 2, 3, 0], TypeError, r"labels must be a torch.Tensor.*list"),
    ],
)
def test_bad_types_and_shapes_raise(features, labels, error, pattern) -> None:
    sar = make_sar(SwitchClassifier(open_margins()))
    with pytest.raises(error, match=pattern):
        sar(features, labels)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_features_raise(value: float) -> None:
    sar = make_sar(SwitchClassifier(open_margins()))
    features, labels = dense_batch()
    features[1, 3, 2, 2] = value
    with pytest.raises(ValueError, match=r"features must be finite, got 1 NaN/inf"):
        sar(features, labels)


@pytest.mark.parametrize(
    "classifier",
    [
        lambda p: p[:, : C - 1],
        lambda p: torch.zeros(C + 1, C) + p.sum(),
        lambda p: p,
        lambda p: (p[:, :C],),
    ],
)
def test_classifier_with_wrong_output_raises(classifier) -> None:
    sar = make_sar(classifier)
    with pytest.raises(ValueError, match=rf"classifier must map .* to \({C}, {C}\) logits, got"):
        sar(*flat_batch())


@pytest.mark.parametrize(
    ("layer", "pattern"),
    [
        (nn.Linear(D + 1, C), rf"nn.Linear\({D}, {C}\).*got nn.Linear\({D + 1}, {C}\)"),
        (nn.Linear(D, C + 2), rf"nn.Linear\({D}, {C}\).*got nn.Linear\({D}, {C + 2}\)"),
        (nn.Conv2d(D, C, 3), r"kernel_size=1.*kernel_size=\(3, 3\)"),
        (
            nn.Conv2d(D, C - 1, 1),
            rf"nn.Conv2d\({D}, {C}, kernel_size=1\), got nn.Conv2d\({D}, {C - 1}",
        ),
    ],
)
def test_classifier_layer_with_wrong_size_raises(layer: nn.Module, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        SemanticAnchorRegularizer(C, D, layer)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"num_classes": 1}, ValueError, r"num_classes must be >= 2, got 1"),
        ({"num_classes": 0}, ValueError, r"num_classes must be >= 2, got 0"),
        ({"num_classes": 2.0}, TypeError, r"num_classes must be an int, got float"),
        ({"classifier": "linear"}, TypeError, r"classifier must be .* got str"),
        ({"feat_dim": 0}, ValueError, r"feat_dim must be >= 1, got 0"),
        ({"filter_conf": 1.5}, ValueError, r"filter_conf must lie in \[0, 1\], got 1.5"),
        ({"ema_momentum": -0.1}, ValueError, r"ema_momentum must lie in \[0, 1\], got -0.1"),
        ({"pull_weight": float("nan")}, ValueError, "pull_weight must be finite and >= 0, got nan"),
        ({"pull_weight": float("inf")}, ValueError, "pull_weight must be finite and >= 0, got inf"),
        ({"aux_weight": "1"}, TypeError, r"aux_weight must be a real number, got str"),
        ({"seed": 1.5}, TypeError, r"seed must be None or an int, got float 1.5"),
        ({"seed": True}, TypeError, r"seed must be None or an int, got bool True"),
        ({"ignore_index": 1.0}, TypeError, r"ignore_index must be an int or None, got float"),
        ({"projector": lambda a: a}, TypeError, r"projector must be an nn.Module, got function"),
        ({"gate_warn_steps": 0}, ValueError, r"gate_warn_steps must be >= 1, got 0"),
    ],
)
def test_bad_constructor_arguments_raise(kwargs, error, pattern) -> None:
    args = {"num_classes": C, "feat_dim": D, "classifier": lambda p: p[:, :C]} | kwargs
    with pytest.raises(error, match=pattern):
        SemanticAnchorRegularizer(**args)


def test_projector_with_wrong_output_shape_raises() -> None:
    sar = make_sar(SwitchClassifier(open_margins()), projector=nn.Linear(D, D + 1))
    with pytest.raises(ValueError, match=rf"projector must map \({C}, {D}\).*got \({C}, {D + 1}\)"):
        sar(*flat_batch())


# --- the dense pull ----------------------------------------------------------------------


@HYPOTHESIS
@given(
    b=st.integers(1, 3),
    h=st.integers(1, 5),
    w=st.integers(1, 5),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_dense_pull_equals_gather(b: int, h: int, w: int, dtype: torch.dtype, seed: int) -> None:
    torch.manual_seed(seed)
    anchors = torch.randn(C, D, dtype=dtype)
    labels = torch.randint(0, C, (b, h, w))
    labels[torch.rand(b, h, w) < 0.25] = IGNORE
    features = torch.randn(b, D, h, w, dtype=dtype)
    features[:, :, 0, 0] = 0.0
    where = labels != IGNORE
    # Some positions sit exactly on their anchor: zero distance, zero gradient.
    features[:, :, -1, -1] = anchors[torch.where(where, labels, 0)[:, -1, -1]]
    features.requires_grad_()

    dense = _masked_pull(features, labels, anchors, IGNORE)
    flat = features.permute(0, 2, 3, 1).reshape(-1, D)
    gathered = flat - anchors[torch.where(where, labels, 0).reshape(-1)]
    valid = where.reshape(-1)
    expected = (gathered.pow(2).sum(1) * valid).sum() / (valid.sum().clamp_min(1) * D)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-14}
    torch.testing.assert_close(dense, expected, **tol)
    torch.testing.assert_close(_masked_pull(flat, labels.reshape(-1), anchors, IGNORE), expected)

    (grad,) = torch.autograd.grad(dense, features)
    (expected_grad,) = torch.autograd.grad(expected, features)
    assert bool(torch.isfinite(grad).all())
    torch.testing.assert_close(grad, expected_grad, **tol)
    on_anchor = where[:, -1, -1]
    assert torch.equal(
        grad[:, :, -1, -1][on_anchor], torch.zeros_like(grad[:, :, -1, -1][on_anchor])
    )


def test_dense_pull_gives_no_gradient_to_anchors() -> None:
    anchors = torch.randn(C, D, requires_grad=True)
    features, labels = dense_batch()
    features.requires_grad_()
    pull = _masked_pull(features, labels, anchors, IGNORE)
    assert float(pull.detach()) > 0
    grads = torch.autograd.grad(pull, [features, anchors], allow_unused=True)
    assert grads[0] is not None and grads[1] is None
