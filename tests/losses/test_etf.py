"""ETFClassifier and DotRegressionLoss against the definitions, written out directly."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anchorlearn.losses.etf import DotRegressionLoss, ETFClassifier, simplex_etf

C, D = 5, 8
IGNORE = 255
DTYPES = [torch.float32, torch.float64]
AUTOCAST_RTOL = 1e-4  # loss computed in float32 from the bf16 features


def reference_dot_regression(
    features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """Loop over positions; dense labels resized by explicit nearest-neighbour indexing."""
    features = features.double()
    rows, ys = [], []
    if features.ndim == 4:
        b, _, h, w = features.shape
        h_in, w_in = labels.shape[1:]
        for n in range(b):
            for i in range(h):
                for j in range(w):
                    rows.append(features[n, :, i, j])
                    ys.append(int(labels[n, (i * h_in) // h, (j * w_in) // w]))
    else:
        rows, ys = list(features), [int(y) for y in labels]
    terms = []
    for h_vec, y in zip(rows, ys, strict=True):
        if y == IGNORE:
            continue
        w_y = weight[y].double()
        cosine = (w_y / w_y.norm()) @ (h_vec / h_vec.norm())
        terms.append(0.5 * (cosine - 1.0) ** 2)
    return sum(terms) / len(terms) if terms else torch.zeros((), dtype=torch.float64)


# ----------------------------------------------------------------------------- ETF geometry


@pytest.mark.parametrize(("feat_dim", "num_classes"), [(2, 2), (5, 5), (8, 5), (64, 10)])
def test_etf_geometry(feat_dim: int, num_classes: int) -> None:
    frame = simplex_etf(feat_dim, num_classes)
    assert frame.shape == (feat_dim, num_classes) and frame.dtype == torch.float64
    gram = frame.T @ frame
    expected = torch.full((num_classes, num_classes), -1.0 / (num_classes - 1), dtype=torch.float64)
    expected.fill_diagonal_(1.0)
    torch.testing.assert_close(gram, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(frame.sum(dim=1), torch.zeros(feat_dim, dtype=torch.float64))


def test_etf_classifier_weight_properties() -> None:
    etf = ETFClassifier(D, C)
    assert etf.weight.shape == (C, D) and etf.weight.dtype == torch.float32
    assert "weight" in dict(etf.named_buffers())
    assert list(etf.parameters()) == []
    norms = etf.weight.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(C), rtol=0, atol=1e-6)
    cos = etf.weight @ etf.weight.T
    off_diagonal = cos[~torch.eye(C, dtype=torch.bool)]
    torch.testing.assert_close(off_diagonal, torch.full_like(off_diagonal, -1 / (C - 1)))


def test_etf_is_seeded_and_seed_changes_it() -> None:
    torch.testing.assert_close(ETFClassifier(D, C).weight, ETFClassifier(D, C).weight)
    assert not torch.allclose(ETFClassifier(D, C).weight, ETFClassifier(D, C, seed=1).weight)


@pytest.mark.parametrize("dtype", DTYPES)
def test_etf_forward_linear_and_dense(dtype: torch.dtype) -> None:
    etf = ETFClassifier(D, C).to(dtype)
    x = torch.randn(4, D, dtype=dtype)
    logits = etf(x)
    assert logits.shape == (4, C) and logits.dtype == dtype
    expected = torch.stack(
        [torch.stack([etf.weight[c] @ x[n] for c in range(C)]) for n in range(4)]
    )
    torch.testing.assert_close(logits, expected)
    dense = torch.randn(2, D, 3, 2, dtype=dtype)
    dense_logits = etf(dense)
    assert dense_logits.shape == (2, C, 3, 2)
    for i in range(3):
        for j in range(2):
            torch.testing.assert_close(dense_logits[:, :, i, j], etf(dense[:, :, i, j]))


def test_etf_classifies_anchor_matrix_and_bias() -> None:
    etf = ETFClassifier(D, C, bias=True)
    assert [name for name, _ in etf.named_parameters()] == ["bias"]
    anchors = torch.randn(C, D, requires_grad=True)
    logits = etf(anchors)
    assert logits.shape == (C, C)
    torch.nn.functional.cross_entropy(logits, torch.arange(C)).backward()
    assert anchors.grad is not None and etf.bias.grad is not None
    # the ETF itself classifies its own vertices perfectly
    assert torch.equal(etf(etf.weight).argmax(dim=1), torch.arange(C))


def test_etf_autocast_bf16() -> None:
    etf = ETFClassifier(D, C)
    x = torch.randn(6, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = etf(x)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), x @ etf.weight.T, rtol=2e-2, atol=2e-2)


def test_etf_state_dict_and_to() -> None:
    etf = ETFClassifier(D, C, seed=3)
    buffer = io.BytesIO()
    torch.save(etf.state_dict(), buffer)
    buffer.seek(0)
    restored = ETFClassifier(D, C)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(restored.weight, etf.weight)
    assert restored.to(torch.float64).weight.dtype == torch.float64


def test_etf_too_few_dims_raises() -> None:
    with pytest.raises(ValueError, match=r"feat_dim.*num_classes"):
        ETFClassifier(3, 4)
    with pytest.raises(ValueError, match="num_classes"):
        ETFClassifier(3, 1)


@settings(max_examples=15, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=5))
def test_etf_bad_input_shapes_raise(shape: list[int]) -> None:
    if len(shape) in (2, 4) and shape[1] == D:
        shape[1] = D + 1
    with pytest.raises(ValueError, match="x must have shape"):
        ETFClassifier(D, C)(torch.randn(*shape))


# ----------------------------------------------------------------------------- dot regression


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dense", [False, True])
def test_dot_regression_matches_reference(dtype: torch.dtype, dense: bool) -> None:
    etf = ETFClassifier(D, C)
    loss_fn = DotRegressionLoss(etf).to(dtype)
    if dense:
        feats = torch.randn(2, D, 3, 2, dtype=dtype, requires_grad=True)
        labels = torch.randint(0, C, (2, 6, 4))
    else:
        feats = torch.randn(7, D, dtype=dtype, requires_grad=True)
        labels = torch.randint(0, C, (7,))
    labels[..., 0] = IGNORE
    out = loss_fn(feats, labels)
    assert set(out) == {"loss", "dot_regression"}
    assert out["loss"].dtype == dtype
    torch.testing.assert_close(
        out["loss"].double(), reference_dot_regression(feats.detach(), labels, etf.weight)
    )
    out["loss"].backward()
    assert feats.grad.abs().sum() > 0


def test_dot_regression_zero_on_vertices_and_scale_invariant() -> None:
    etf = ETFClassifier(D, C)
    loss_fn = DotRegressionLoss(etf)
    out = loss_fn(3.0 * etf.weight, torch.arange(C))
    torch.testing.assert_close(out["loss"], torch.tensor(0.0), rtol=0, atol=1e-10)
    # the opposite direction: cosine -1, loss 1/2 * 4 = 2
    out = loss_fn(-etf.weight[:1], torch.tensor([0]))
    torch.testing.assert_close(out["loss"], torch.tensor(2.0))


def test_dot_regression_accepts_raw_weight_tensor() -> None:
    weight = torch.randn(C, D) * 4
    loss_fn = DotRegressionLoss(weight, ignore_index=None)
    torch.testing.assert_close(loss_fn.weight.norm(dim=1), torch.ones(C))
    feats, labels = torch.randn(6, D), torch.randint(0, C, (6,))
    torch.testing.assert_close(
        loss_fn(feats, labels)["loss"].double(), reference_dot_regression(feats, labels, weight)
    )


def test_dot_regression_autocast_bf16() -> None:
    layer = torch.nn.Linear(4, D)
    etf = ETFClassifier(D, C)
    loss_fn = DotRegressionLoss(etf)
    labels = torch.randint(0, C, (9,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = layer(torch.randn(9, 4))
        assert feats.dtype == torch.bfloat16
        out = loss_fn(feats, labels)
    assert out["loss"].dtype == torch.float32
    torch.testing.assert_close(
        out["loss"].double(),
        reference_dot_regression(feats.detach().float(), labels, etf.weight),
        rtol=AUTOCAST_RTOL,
        atol=1e-6,
    )
    out["loss"].backward()
    assert torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize("dense", [False, True])
def test_dot_regression_all_ignored(dense: bool) -> None:
    loss_fn = DotRegressionLoss(ETFClassifier(D, C))
    feats = torch.randn(*((2, D, 2, 2) if dense else (3, D)), requires_grad=True)
    out = loss_fn(feats, torch.full((2, 4, 4) if dense else (3,), IGNORE))
    assert torch.isfinite(out["loss"]) and out["loss"] == 0
    out["loss"].backward()
    assert torch.equal(feats.grad, torch.zeros_like(feats))


def test_dot_regression_state_dict_round_trip() -> None:
    loss_fn = DotRegressionLoss(ETFClassifier(D, C, seed=7))
    restored = DotRegressionLoss(torch.randn(C, D))
    restored.load_state_dict(loss_fn.state_dict())
    torch.testing.assert_close(restored.weight, loss_fn.weight)


def test_dot_regression_composes_with_cross_entropy_on_etf_logits() -> None:
    etf = ETFClassifier(D, C)
    layer = torch.nn.Linear(4, D)
    feats = layer(torch.randn(6, 4))
    labels = torch.randint(0, C, (6,))
    total = DotRegressionLoss(etf)(feats, labels)["loss"] + torch.nn.functional.cross_entropy(
        etf(feats), labels
    )
    total.backward()
    assert layer.weight.grad.abs().sum() > 0


def test_dot_regression_bad_input_raises() -> None:
    with pytest.raises(TypeError, match="etf"):
        DotRegressionLoss("etf")
    with pytest.raises(ValueError, match="etf"):
        DotRegressionLoss(torch.randn(C))
    with pytest.raises(ValueError, match="num_classes"):
        DotRegressionLoss(torch.randn(1, D))
    with pytest.raises(ValueError, match="etf must be finite"):
        DotRegressionLoss(torch.full((C, D), math.nan))
    loss_fn = DotRegressionLoss(ETFClassifier(D, C))
    with pytest.raises(ValueError, match="features"):
        loss_fn(torch.randn(3, D + 1), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        loss_fn(torch.randn(3, D), torch.full((3,), C))
    with pytest.raises(TypeError, match="labels"):
        loss_fn(torch.randn(3, D), torch.zeros(3))


@pytest.mark.parametrize(("seed", "got"), [(None, "NoneType None"), (1.5, "float 1.5")])
def test_etf_seed_must_be_an_int(seed, got: str) -> None:
    with pytest.raises(TypeError, match=f"seed must be an int, got {got}"):
        simplex_etf(8, 4, seed=seed)
