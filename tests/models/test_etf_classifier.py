"""simplex_etf and ETFClassifier against the definitions, written out directly."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anchorlearn.models.etf import ETFClassifier, simplex_etf

C, D = 5, 8
DTYPES = [torch.float32, torch.float64]


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


@pytest.mark.parametrize(("seed", "got"), [(None, "NoneType None"), (1.5, "float 1.5")])
def test_etf_seed_must_be_an_int(seed, got: str) -> None:
    with pytest.raises(TypeError, match=f"seed must be an int, got {got}"):
        simplex_etf(8, 4, seed=seed)


def test_uniform_geometry_spreads_more_classes_than_an_etf_can_hold() -> None:
    """C = 12 > D + 1 = 4: no simplex ETF exists; the uniform rows are unit vectors far
    apart (the best packing of 12 points on S^2, the icosahedron, has max cosine 1/sqrt(5))."""
    classifier = ETFClassifier(3, 12, geometry="uniform", seed=1)
    rows = classifier.weight.double()
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(12, dtype=torch.float64))
    cosines = rows @ rows.T - 2 * torch.eye(12, dtype=torch.float64)
    assert cosines.max().item() < 0.5  # random unit vectors come much closer
    assert cosines.max().item() > 1 / 5**0.5 - 1e-3  # no packing beats the icosahedron
    x = torch.randn(4, 3)
    torch.testing.assert_close(classifier(x), x @ classifier.weight.T)
    assert "geometry='uniform'" in repr(classifier)


def test_uniform_geometry_reaches_the_simplex_when_it_exists() -> None:
    rows = ETFClassifier(D, C, geometry="uniform").weight.double()
    gram = rows @ rows.T
    off_diagonal = gram[~torch.eye(C, dtype=torch.bool)]
    torch.testing.assert_close(
        off_diagonal, torch.full_like(off_diagonal, -1 / (C - 1)), rtol=0, atol=1e-3
    )


def test_an_unknown_geometry_is_refused() -> None:
    with pytest.raises(ValueError, match=r"geometry must be one of \['etf', 'uniform'\]"):
        ETFClassifier(D, C, geometry="random")


def test_the_config_builds_fixed_hyperspherical_prototypes(tmp_path) -> None:
    from anchorlearn.engine.config import ConfigError, parse_config
    from anchorlearn.engine.runner import build_run

    raw = {
        "data": {"source": "digits", "batch_size": 64},
        "model": {
            "name": "small_cnn",
            "kwargs": {"width": 4, "feat_dim": 4},
            "etf_classifier": True,
            "classifier_geometry": "uniform",
        },
        "losses": ["dot_regression"],
    }
    _, module = build_run(parse_config(raw))
    weight = module.model.classifier.weight
    assert module.model.classifier.geometry == "uniform" and weight.shape == (10, 4)
    with pytest.raises(ConfigError, match=r"needs model\.etf_classifier: true"):
        parse_config({**raw, "model": {**raw["model"], "etf_classifier": False}})
    with pytest.raises(ConfigError, match=r"model\.classifier_geometry must be one of"):
        parse_config({**raw, "model": {**raw["model"], "classifier_geometry": "cube"}})
