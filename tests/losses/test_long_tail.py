"""Long-tail task losses against explicit one-hot softmax cross-entropy."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anchorlearn.losses.long_tail import BalancedSoftmaxLoss, CrossEntropyLoss, LogitAdjustedLoss

COUNTS = [50.0, 20.0, 5.0, 1.0]
C = len(COUNTS)
IGNORE = 255
DTYPES = [torch.float32, torch.float64]
AUTOCAST_RTOL = 1e-4  # computed in float32 from the bf16 logits


def reference_ce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    adjustment: list[float],
    smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean over non-ignored positions of -sum_c q_c log softmax(z + adjustment)_c."""
    logits = logits.detach().double()
    if logits.ndim == 4:
        logits = logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1])
        labels = labels.reshape(-1)
    num_classes = logits.shape[1]
    terms = []
    for z, y in zip(logits, labels.tolist(), strict=True):
        if y == IGNORE:
            continue
        adjusted = [float(z[c]) + adjustment[c] for c in range(num_classes)]
        log_norm = torch.tensor(adjusted, dtype=torch.float64).exp().sum().log()
        target = [smoothing / num_classes + (1 - smoothing) * (c == y) for c in range(num_classes)]
        terms.append(-sum(target[c] * (adjusted[c] - log_norm) for c in range(num_classes)))
    return sum(terms) / len(terms) if terms else torch.zeros((), dtype=torch.float64)


def log_prior(tau: float) -> list[float]:
    total = sum(COUNTS)
    return [tau * float(torch.tensor(n / total, dtype=torch.float64).log()) for n in COUNTS]


def log_counts() -> list[float]:
    return [float(torch.tensor(n, dtype=torch.float64).log()) for n in COUNTS]


CASES = [
    ("logit_adjusted", lambda: LogitAdjustedLoss(COUNTS), lambda: log_prior(1.0)),
    ("logit_adjusted_tau", lambda: LogitAdjustedLoss(COUNTS, tau=0.5), lambda: log_prior(0.5)),
    ("balanced_softmax", lambda: BalancedSoftmaxLoss(COUNTS), log_counts),
    ("cross_entropy", lambda: CrossEntropyLoss(), lambda: [0.0] * C),
]
CASE_IDS = [case[0] for case in CASES]


def random_labels(*shape: int) -> torch.Tensor:
    labels = torch.randint(0, C, shape)
    labels[torch.rand(shape) < 0.25] = IGNORE
    return labels


@pytest.mark.parametrize(("name", "make", "adjustment"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dense", [False, True])
def test_matches_reference(name, make, adjustment, dtype: torch.dtype, dense: bool) -> None:
    loss_fn = make().to(dtype)
    if dense:
        logits = torch.randn(2, C, 3, 4, dtype=dtype, requires_grad=True)
        labels = random_labels(2, 3, 4)
    else:
        logits = torch.randn(8, C, dtype=dtype, requires_grad=True)
        labels = random_labels(8)
    out = loss_fn(logits, labels)
    assert set(out) == {"loss", "ce"}
    assert out["loss"].dtype == dtype
    torch.testing.assert_close(out["loss"].double(), reference_ce(logits, labels, adjustment()))
    out["loss"].backward()
    assert logits.grad.abs().sum() > 0


def test_label_smoothing_matches_reference() -> None:
    logits, labels = torch.randn(6, C), random_labels(6)
    out = CrossEntropyLoss(label_smoothing=0.2)(logits, labels)
    torch.testing.assert_close(
        out["ce"].double(), reference_ce(logits, labels, [0.0] * C, smoothing=0.2)
    )


def test_balanced_softmax_equals_logit_adjustment_with_tau_one() -> None:
    logits, labels = torch.randn(10, C), random_labels(10)
    torch.testing.assert_close(
        BalancedSoftmaxLoss(COUNTS)(logits, labels)["loss"],
        LogitAdjustedLoss(COUNTS, tau=1.0)(logits, labels)["loss"],
    )


def test_adjustment_favours_tail_class_gradient() -> None:
    """Equal logits: the adjusted loss pushes the tail logit up harder than plain CE."""
    logits = torch.zeros(1, C, requires_grad=True)
    LogitAdjustedLoss(COUNTS)(logits, torch.tensor([C - 1]))["loss"].backward()
    adjusted_grad = logits.grad[0, C - 1].item()
    logits.grad = None
    CrossEntropyLoss()(logits, torch.tensor([C - 1]))["loss"].backward()
    assert adjusted_grad < logits.grad[0, C - 1].item() < 0


@pytest.mark.parametrize(("name", "make", "adjustment"), CASES, ids=CASE_IDS)
def test_autocast_bf16(name, make, adjustment) -> None:
    layer = torch.nn.Linear(3, C)
    loss_fn = make()
    labels = random_labels(7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(torch.randn(7, 3))
        assert logits.dtype == torch.bfloat16
        out = loss_fn(logits, labels)
    assert out["loss"].dtype == torch.float32
    torch.testing.assert_close(
        out["loss"].double(),
        reference_ce(logits.detach().float(), labels, adjustment()),
        rtol=AUTOCAST_RTOL,
        atol=1e-6,
    )
    out["loss"].backward()
    assert torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize(("name", "make", "adjustment"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dense", [False, True])
def test_all_ignored_is_finite_zero(name, make, adjustment, dense: bool) -> None:
    logits = torch.randn(*((2, C, 2, 2) if dense else (3, C)), requires_grad=True)
    out = make()(logits, torch.full((2, 2, 2) if dense else (3,), IGNORE))
    assert torch.isfinite(out["loss"]) and out["loss"] == 0
    out["loss"].backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_state_dict_round_trip_and_to_float64() -> None:
    loss_fn = LogitAdjustedLoss(COUNTS, tau=2.0)
    buffer = io.BytesIO()
    torch.save(loss_fn.state_dict(), buffer)
    buffer.seek(0)
    restored = LogitAdjustedLoss([1.0] * C, tau=2.0)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(restored.adjustment, loss_fn.adjustment)
    torch.testing.assert_close(restored.adjustment.double(), torch.tensor(log_prior(2.0)).double())
    assert restored.to(torch.float64).adjustment.dtype == torch.float64
    assert CrossEntropyLoss().state_dict() == {}


def test_class_counts_accepts_tensor() -> None:
    loss_fn = BalancedSoftmaxLoss(torch.tensor([3, 1], dtype=torch.long))
    torch.testing.assert_close(loss_fn.adjustment, torch.tensor([3.0, 1.0]).log())


def test_composition_with_two_losses_backprops() -> None:
    layer = torch.nn.Linear(3, C)
    logits = layer(torch.randn(5, 3))
    labels = random_labels(5)
    total = (
        LogitAdjustedLoss(COUNTS)(logits, labels)["loss"]
        + CrossEntropyLoss()(logits, labels)["loss"]
    )
    total.backward()
    assert layer.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("counts", [[5.0, 0.0, 2.0], [1.0, 2.0, -3.0]])
def test_non_positive_count_names_the_class(counts: list[float]) -> None:
    index = next(i for i, n in enumerate(counts) if n <= 0)
    for cls in (LogitAdjustedLoss, BalancedSoftmaxLoss):
        with pytest.raises(ValueError, match=rf"class_counts\[{index}\]"):
            cls(counts)


def test_bad_class_counts_raise() -> None:
    with pytest.raises(ValueError, match="class_counts must be 1-D with >= 2"):
        LogitAdjustedLoss([4.0])
    with pytest.raises(ValueError, match="class_counts must be 1-D"):
        BalancedSoftmaxLoss(torch.ones(2, 2))
    with pytest.raises(ValueError, match="class_counts must be finite"):
        BalancedSoftmaxLoss([1.0, float("inf")])
    with pytest.raises(TypeError, match="class_counts"):
        LogitAdjustedLoss("abc")
    with pytest.raises(TypeError, match="class_counts"):
        LogitAdjustedLoss([1, "2"])
    with pytest.raises(ValueError, match="tau"):
        LogitAdjustedLoss(COUNTS, tau=-1.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        CrossEntropyLoss(label_smoothing=1.5)


@pytest.mark.parametrize("cls", [LogitAdjustedLoss, BalancedSoftmaxLoss])
@settings(max_examples=10, deadline=None)
@given(num_classes=st.integers(1, 8).filter(lambda c: c != C))
def test_wrong_number_of_classes_raises(cls: type, num_classes: int) -> None:
    with pytest.raises(ValueError, match=r"logits must have 4 classes.*class_counts"):
        cls(COUNTS)(torch.randn(3, num_classes), torch.zeros(3, dtype=torch.long))


@settings(max_examples=15, deadline=None)
@given(
    logit_shape=st.sampled_from([(3, C), (2, C, 4, 4)]),
    label_shape=st.lists(st.integers(1, 5), min_size=1, max_size=4),
)
def test_mismatched_label_shape_raises(logit_shape: tuple, label_shape: list[int]) -> None:
    expected = (logit_shape[0], *logit_shape[2:])
    if tuple(label_shape) == expected:
        label_shape.append(2)
    with pytest.raises(ValueError, match="labels must have shape"):
        LogitAdjustedLoss(COUNTS)(torch.randn(*logit_shape), torch.zeros(label_shape).long())


@settings(max_examples=10, deadline=None)
@given(ndim=st.sampled_from([1, 3, 5]))
def test_wrong_logit_ndim_raises(ndim: int) -> None:
    shape = (2, C, 2, 2, 2)[:ndim]
    with pytest.raises(ValueError, match="logits must be 2-D"):
        CrossEntropyLoss()(torch.randn(*shape), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize(("name", "make", "adjustment"), CASES, ids=CASE_IDS)
def test_bad_labels_raise(name, make, adjustment) -> None:
    loss_fn = make()
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        loss_fn(torch.randn(2, C), torch.zeros(2))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        loss_fn(torch.randn(2, C), torch.tensor([0, C]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        loss_fn(torch.randn(2, C), torch.tensor([0, -1]))
    with pytest.raises(TypeError, match="logits"):
        loss_fn(torch.zeros(2, C, dtype=torch.long), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="logits must be finite"):
        loss_fn(torch.full((2, C), float("nan")), torch.tensor([0, 1]))
