"""DotRegressionLoss against the definition, written out directly."""

from __future__ import annotations

import math

import pytest
import torch

from anchorlearn.losses.etf import DotRegressionLoss
from anchorlearn.models.etf import ETFClassifier

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


# ----------------------------------------------------------------------------- dot regression


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dense", [False, True])
def test_dot_regression_matches_reference(dtype: torch.dtype, dense: bool) -> None:
    etf = ETFClassifier(D, C)
    loss_fn = DotRegressionLoss(etf.weight).to(dtype)
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
    loss_fn = DotRegressionLoss(etf.weight)
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
    loss_fn = DotRegressionLoss(etf.weight)
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
    loss_fn = DotRegressionLoss(ETFClassifier(D, C).weight)
    feats = torch.randn(*((2, D, 2, 2) if dense else (3, D)), requires_grad=True)
    out = loss_fn(feats, torch.full((2, 4, 4) if dense else (3,), IGNORE))
    assert torch.isfinite(out["loss"]) and out["loss"] == 0
    out["loss"].backward()
    assert torch.equal(feats.grad, torch.zeros_like(feats))


def test_dot_regression_state_dict_round_trip() -> None:
    loss_fn = DotRegressionLoss(ETFClassifier(D, C, seed=7).weight)
    restored = DotRegressionLoss(torch.randn(C, D))
    restored.load_state_dict(loss_fn.state_dict())
    torch.testing.assert_close(restored.weight, loss_fn.weight)


def test_dot_regression_composes_with_cross_entropy_on_etf_logits() -> None:
    etf = ETFClassifier(D, C)
    layer = torch.nn.Linear(4, D)
    feats = layer(torch.randn(6, 4))
    labels = torch.randint(0, C, (6,))
    total = DotRegressionLoss(etf.weight)(feats, labels)[
        "loss"
    ] + torch.nn.functional.cross_entropy(etf(feats), labels)
    total.backward()
    assert layer.weight.grad.abs().sum() > 0


def test_dot_regression_bad_input_raises() -> None:
    with pytest.raises(TypeError, match=r"etf_weight must be a torch\.Tensor, got str"):
        DotRegressionLoss("etf")
    with pytest.raises(
        TypeError,
        match=r"etf_weight must be a \(C, D\) tensor, got the module "
        r"ETFClassifier: pass its \.weight",
    ):
        DotRegressionLoss(ETFClassifier(D, C))
    with pytest.raises(ValueError, match=r"etf_weight must be a 2-D \(C, D\) tensor, got shape"):
        DotRegressionLoss(torch.randn(C))
    with pytest.raises(ValueError, match="num_classes"):
        DotRegressionLoss(torch.randn(1, D))
    with pytest.raises(ValueError, match="etf_weight must be finite"):
        DotRegressionLoss(torch.full((C, D), math.nan))
    loss_fn = DotRegressionLoss(ETFClassifier(D, C).weight)
    with pytest.raises(ValueError, match="features"):
        loss_fn(torch.randn(3, D + 1), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        loss_fn(torch.randn(3, D), torch.full((3,), C))
    with pytest.raises(TypeError, match="labels"):
        loss_fn(torch.randn(3, D), torch.zeros(3))
