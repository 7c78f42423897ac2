"""EMAPrototypeLoss and CenterLoss against straightforward loop implementations."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anchorlearn.losses.prototypes import CenterLoss, EMAPrototypeLoss

C, D = 4, 3
IGNORE = 255
DTYPES = [torch.float32, torch.float64]
# Internally the losses compute in float32 under bf16 autocast; compared with a float32
# reference on the same (bf16-rounded) features they agree to float32 rounding.
AUTOCAST_RTOL = 1e-4


def nearest_resize(labels: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Nearest-neighbour resize with explicit index arithmetic: src = floor(dst * in / out)."""
    b, h_in, w_in = labels.shape
    out = torch.empty(b, h, w, dtype=labels.dtype)
    for n in range(b):
        for i in range(h):
            for j in range(w):
                out[n, i, j] = labels[n, (i * h_in) // h, (j * w_in) // w]
    return out


def as_rows(features: torch.Tensor, labels: torch.Tensor) -> tuple[list, list]:
    """Python lists of (D,) feature rows and int labels; dense inputs resized first."""
    if features.ndim == 4:
        b, _, h, w = features.shape
        labels = nearest_resize(labels, h, w)
        rows = [features[n, :, i, j] for n in range(b) for i in range(h) for j in range(w)]
        return rows, [int(labels[n, i, j]) for n in range(b) for i in range(h) for j in range(w)]
    return list(features), [int(y) for y in labels]


class ReferenceEMA:
    """Dictionary-of-prototypes EMA with python loops."""

    def __init__(self, momentum: float) -> None:
        self.momentum = momentum
        self.protos: dict[int, torch.Tensor] = {}

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        rows, ys = as_rows(features.detach().double(), labels)
        for c in range(C):
            members = [r for r, y in zip(rows, ys, strict=True) if y == c]
            if not members:
                continue
            mean = sum(members) / len(members)
            if c in self.protos:
                self.protos[c] = self.momentum * self.protos[c] + (1 - self.momentum) * mean
            else:
                self.protos[c] = mean

    def pull(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        rows, ys = as_rows(features.double(), labels)
        terms = [
            ((r - self.protos[y]) ** 2).sum() / D
            for r, y in zip(rows, ys, strict=True)
            if y in self.protos
        ]
        return sum(terms) / len(terms) if terms else torch.zeros((), dtype=torch.float64)


def reference_center(features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor):
    rows, ys = as_rows(features.double(), labels)
    terms = [
        0.5 * ((r - centers.double()[y]) ** 2).sum()
        for r, y in zip(rows, ys, strict=True)
        if y != IGNORE
    ]
    return sum(terms) / len(terms) if terms else torch.zeros((), dtype=torch.float64)


def random_labels(*shape: int, p_ignore: float = 0.2) -> torch.Tensor:
    labels = torch.randint(0, C, shape)
    labels[torch.rand(shape) < p_ignore] = IGNORE
    return labels


# ----------------------------------------------------------------------------- EMA prototypes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dense", [False, True])
def test_ema_matches_reference_over_steps(dtype: torch.dtype, dense: bool) -> None:
    loss_fn = EMAPrototypeLoss(C, D, weight=0.5, momentum=0.7).to(dtype)
    ref = ReferenceEMA(0.7)
    for step in range(4):
        if dense:
            feats = torch.randn(2, D, 3, 4, dtype=dtype, requires_grad=True)
            labels = random_labels(2, 6, 8)
        else:
            feats = torch.randn(10, D, dtype=dtype, requires_grad=True)
            labels = random_labels(10)
        if step == 0:  # class 3 is first seen at step 1: exercises first-seen initialisation
            labels[labels == 3] = IGNORE
        out = loss_fn(feats, labels)
        ref.update(feats, labels)
        expected = ref.pull(feats, labels)
        assert set(out) == {"loss", "pull"}
        assert out["loss"].dtype == dtype
        torch.testing.assert_close(out["pull"].double(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["loss"], 0.5 * out["pull"])
        for c in range(C):
            assert bool(loss_fn.initialized[c]) == (c in ref.protos)
            if c in ref.protos:
                torch.testing.assert_close(
                    loss_fn.prototypes[c].double(), ref.protos[c], rtol=1e-5, atol=1e-6
                )
        out["loss"].backward()
        assert feats.grad is not None and torch.isfinite(feats.grad).all()


def test_ema_first_seen_then_momentum_explicit() -> None:
    loss_fn = EMAPrototypeLoss(C, D, momentum=0.9)
    loss_fn(torch.full((2, D), 2.0), torch.tensor([1, 1]))
    torch.testing.assert_close(loss_fn.prototypes[1], torch.full((D,), 2.0))
    assert loss_fn.initialized.tolist() == [False, True, False, False]
    loss_fn(torch.full((1, D), 12.0), torch.tensor([1]))
    torch.testing.assert_close(loss_fn.prototypes[1], torch.full((D,), 0.9 * 2.0 + 0.1 * 12.0))
    assert loss_fn.prototypes[0].abs().sum() == 0  # never seen: untouched


def test_ema_gradient_only_to_features() -> None:
    loss_fn = EMAPrototypeLoss(C, D)
    feats = torch.randn(6, D, requires_grad=True)
    out = loss_fn(feats, torch.tensor([0, 1, 2, 3, 0, 1]))
    out["loss"].backward()
    assert not loss_fn.prototypes.requires_grad
    assert feats.grad is not None and feats.grad.abs().sum() > 0


def test_ema_no_update_in_eval() -> None:
    loss_fn = EMAPrototypeLoss(C, D)
    loss_fn.eval()
    feats = torch.randn(5, D)
    out = loss_fn(feats, torch.tensor([0, 1, 2, 3, 0]))
    assert not loss_fn.initialized.any() and loss_fn.prototypes.abs().sum() == 0
    assert out["loss"] == 0
    loss_fn.train()
    loss_fn(feats, torch.tensor([0, 1, 2, 3, 0]))
    before = loss_fn.prototypes.clone()
    loss_fn.eval()
    out = loss_fn(torch.randn(5, D), torch.tensor([0, 1, 2, 3, 0]))
    torch.testing.assert_close(loss_fn.prototypes, before)
    assert out["pull"] > 0


def test_ema_uninitialised_classes_do_not_contribute() -> None:
    loss_fn = EMAPrototypeLoss(C, D)
    loss_fn(torch.randn(2, D), torch.tensor([0, 0]))
    loss_fn.eval()
    feats = torch.randn(3, D)
    out = loss_fn(feats, torch.tensor([0, 1, 2]))
    expected = ((feats[0] - loss_fn.prototypes[0]) ** 2).sum() / D
    torch.testing.assert_close(out["pull"], expected)


def test_ema_autocast_bf16() -> None:
    layer = torch.nn.Linear(D, D)
    loss_fn = EMAPrototypeLoss(C, D, momentum=0.5)
    ref = ReferenceEMA(0.5)
    inputs, labels = torch.randn(12, D), random_labels(12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = layer(inputs)
        assert feats.dtype == torch.bfloat16
        out = loss_fn(feats, labels)
    assert out["loss"].dtype == torch.float32
    assert loss_fn.prototypes.dtype == torch.float32
    ref.update(feats.float(), labels)
    torch.testing.assert_close(
        out["pull"].double(), ref.pull(feats.float(), labels), rtol=AUTOCAST_RTOL, atol=1e-6
    )
    out["loss"].backward()
    assert torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize("dense", [False, True])
def test_ema_all_ignored_is_finite_zero(dense: bool) -> None:
    loss_fn = EMAPrototypeLoss(C, D)
    loss_fn(torch.randn(4, D), torch.tensor([0, 1, 2, 3]))
    shape = (2, D, 3, 3) if dense else (5, D)
    feats = torch.randn(*shape, requires_grad=True)
    labels = torch.full((2, 3, 3) if dense else (5,), IGNORE)
    before = loss_fn.prototypes.clone()
    out = loss_fn(feats, labels)
    assert torch.isfinite(out["loss"]) and out["loss"] == 0 and out["pull"] == 0
    out["loss"].backward()
    assert torch.equal(feats.grad, torch.zeros_like(feats))
    torch.testing.assert_close(loss_fn.prototypes, before)


def test_ema_state_dict_round_trip_and_to_float64() -> None:
    loss_fn = EMAPrototypeLoss(C, D)
    loss_fn(torch.randn(8, D), random_labels(8, p_ignore=0.0))
    buffer = io.BytesIO()
    torch.save(loss_fn.state_dict(), buffer)
    buffer.seek(0)
    restored = EMAPrototypeLoss(C, D)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(restored.prototypes, loss_fn.prototypes)
    assert torch.equal(restored.initialized, loss_fn.initialized)
    assert set(loss_fn.state_dict()) == {"prototypes", "initialized"}
    as64 = restored.to(torch.float64)
    assert as64.prototypes.dtype == torch.float64 and as64.initialized.dtype == torch.bool
    out = as64(torch.randn(4, D, dtype=torch.float64), torch.tensor([0, 1, 2, 3]))
    assert out["loss"].dtype == torch.float64


def test_ema_ignore_index_none() -> None:
    loss_fn = EMAPrototypeLoss(C, D, ignore_index=None)
    loss_fn(torch.randn(4, D), torch.tensor([0, 1, 2, 3]))
    assert loss_fn.initialized.all()
    with pytest.raises(ValueError, match="labels"):
        loss_fn(torch.randn(2, D), torch.tensor([0, IGNORE]))


# ----------------------------------------------------------------------------- center loss


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dense", [False, True])
def test_center_matches_reference(dtype: torch.dtype, dense: bool) -> None:
    loss_fn = CenterLoss(C, D, weight=0.3).to(dtype)
    if dense:
        feats = torch.randn(2, D, 4, 3, dtype=dtype, requires_grad=True)
        labels = random_labels(2, 8, 6)
    else:
        feats = torch.randn(9, D, dtype=dtype, requires_grad=True)
        labels = random_labels(9)
    out = loss_fn(feats, labels)
    assert set(out) == {"loss", "center"}
    assert out["loss"].dtype == dtype
    torch.testing.assert_close(
        out["center"].double(), reference_center(feats, labels, loss_fn.centers)
    )
    torch.testing.assert_close(out["loss"], 0.3 * out["center"])
    out["loss"].backward()
    assert feats.grad.abs().sum() > 0
    assert loss_fn.centers.grad.abs().sum() > 0


def test_center_gradient_matches_closed_form() -> None:
    loss_fn = CenterLoss(C, D, weight=1.0)
    feats = torch.randn(5, D, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 2, IGNORE])
    loss_fn(feats, labels)["loss"].backward()
    diff = feats.detach()[:4] - loss_fn.centers.detach()[labels[:4]]
    torch.testing.assert_close(feats.grad[:4], diff / 4)
    assert feats.grad[4].abs().sum() == 0
    expected_center_grad = torch.zeros(C, D)
    for i in range(4):
        expected_center_grad[labels[i]] -= diff[i] / 4
    torch.testing.assert_close(loss_fn.centers.grad, expected_center_grad)


def test_center_autocast_bf16() -> None:
    layer = torch.nn.Linear(D, D)
    loss_fn = CenterLoss(C, D)
    inputs, labels = torch.randn(10, D), random_labels(10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = layer(inputs)
        out = loss_fn(feats, labels)
    assert out["loss"].dtype == torch.float32
    torch.testing.assert_close(
        out["center"].double(),
        reference_center(feats.float(), labels, loss_fn.centers),
        rtol=AUTOCAST_RTOL,
        atol=1e-6,
    )
    out["loss"].backward()
    assert torch.isfinite(layer.weight.grad).all() and torch.isfinite(loss_fn.centers.grad).all()


def test_center_all_ignored_is_finite_zero() -> None:
    loss_fn = CenterLoss(C, D)
    feats = torch.randn(2, D, 2, 2, requires_grad=True)
    out = loss_fn(feats, torch.full((2, 4, 4), IGNORE))
    assert torch.isfinite(out["loss"]) and out["loss"] == 0
    out["loss"].backward()
    assert torch.equal(feats.grad, torch.zeros_like(feats))
    assert torch.equal(loss_fn.centers.grad, torch.zeros_like(loss_fn.centers))


def test_center_state_dict_round_trip_and_to_float64() -> None:
    loss_fn = CenterLoss(C, D)
    restored = CenterLoss(C, D)
    restored.load_state_dict(loss_fn.state_dict())
    torch.testing.assert_close(restored.centers, loss_fn.centers)
    restored.to(torch.float64)
    assert restored.centers.dtype == torch.float64
    assert isinstance(restored.centers, torch.nn.Parameter)


def test_composition_backprops_through_both() -> None:
    ema, center = EMAPrototypeLoss(C, D), CenterLoss(C, D)
    layer = torch.nn.Linear(5, D)
    feats = layer(torch.randn(8, 5))
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, IGNORE])
    total = ema(feats, labels)["loss"] + center(feats, labels)["loss"]
    total.backward()
    assert layer.weight.grad.abs().sum() > 0 and center.centers.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("cls", [EMAPrototypeLoss, CenterLoss])
@settings(max_examples=15, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=5))
def test_bad_feature_shapes_raise(cls: type, shape: list[int]) -> None:
    if len(shape) in (2, 4) and shape[1] == D:
        shape[1] = D + 1
    loss_fn = cls(C, D)
    with pytest.raises(ValueError, match="features"):
        loss_fn(torch.randn(*shape), torch.zeros(shape[0], dtype=torch.long))


@pytest.mark.parametrize("cls", [EMAPrototypeLoss, CenterLoss])
@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 6), extra=st.integers(1, 3))
def test_mismatched_label_shapes_raise(cls: type, n: int, extra: int) -> None:
    with pytest.raises(ValueError, match="labels"):
        cls(C, D)(torch.randn(n, D), torch.zeros(n + extra, dtype=torch.long))


@pytest.mark.parametrize("cls", [EMAPrototypeLoss, CenterLoss])
def test_bad_labels_and_arguments_raise(cls: type) -> None:
    loss_fn = cls(C, D)
    with pytest.raises(TypeError, match="labels"):
        loss_fn(torch.randn(2, D), torch.zeros(2))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        loss_fn(torch.randn(2, D), torch.tensor([0, C]))
    with pytest.raises(TypeError, match="features"):
        loss_fn(torch.ones(2, D, dtype=torch.long), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="features must be finite"):
        loss_fn(torch.tensor([[float("nan")] * D, [0.0] * D]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="num_classes"):
        cls(1, D)
    with pytest.raises(ValueError, match="feat_dim"):
        cls(C, 0)
    with pytest.raises(ValueError, match="weight"):
        cls(C, D, weight=-1.0)
    with pytest.raises(TypeError, match="ignore_index"):
        cls(C, D, ignore_index=2.5)


def test_bad_momentum_raises() -> None:
    with pytest.raises(ValueError, match="momentum"):
        EMAPrototypeLoss(C, D, momentum=1.5)


def test_reference_points_are_float32_cpu_copies() -> None:
    ema = EMAPrototypeLoss(C, D)
    ema.prototypes.copy_(torch.randn(C, D))
    name, points = ema.reference_points()
    assert name == "EMA prototypes" and points.dtype == torch.float32
    assert torch.equal(points, ema.prototypes)
    points.zero_()
    assert ema.prototypes.abs().sum() > 0  # a copy, not the buffer
    name, points = ema.double().reference_points()
    assert points.dtype == torch.float32
    torch.testing.assert_close(points, ema.prototypes.float())
    center = CenterLoss(C, D).to(torch.bfloat16)
    name, points = center.reference_points()
    assert name == "centres" and points.dtype == torch.float32 and points.device.type == "cpu"
    assert torch.equal(points, center.centers.detach().float())
