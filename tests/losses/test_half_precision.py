"""Every loss with float16 inputs computes in float32 inside and returns float32 terms.

The inputs are chosen so that float16 arithmetic breaks: features of magnitude about 300 in
a batch of 64 rows of 512 channels sum to about 1e7, far past float16's largest value 65504
(and ``inf * 0`` is NaN). Each loss must give, on such half-precision inputs, the terms it
gives on float32 copies holding the same values, and gradients that are finite and equal to
the float32 ones rounded to float16.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anchorlearn.losses import (
    AlignmentLoss,
    BalancedSoftmaxLoss,
    CenterLoss,
    CorrelationLoss,
    CrossEntropyLoss,
    DotRegressionLoss,
    EMAPrototypeLoss,
    InfoNCE,
    LogitAdjustedLoss,
    PAUCLoss,
    ProtoNCE,
    SemanticAnchorRegularizer,
    UniformityLoss,
)
from anchorlearn.models import ETFClassifier

N, D, C = 64, 512, 4
HALF_MAX = torch.finfo(torch.float16).max
SIZES = (5, 9)  # prototypes per granularity


def big(*shape: int, seed: int = 0) -> torch.Tensor:
    """Float16 values around 300 (all positive): any float16 sum over a batch overflows."""
    generator = torch.Generator().manual_seed(seed)
    return (300.0 + 10.0 * torch.randn(*shape, generator=generator)).half()


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    """Float16 rows of unit norm (normalised in float32, then rounded)."""
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=generator), dim=-1).half()


def class_labels(*shape: int) -> torch.Tensor:
    return torch.arange(int(torch.tensor(shape).prod())).reshape(shape) % C


def as_float32(value: Any) -> Any:
    """``value`` with every floating tensor (also inside lists) converted to float32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, list):
        return [as_float32(v) for v in value]
    return value


def assert_half_matches_float32(
    make: Callable[[], Callable[..., dict]], half: torch.Tensor, *rest: Any, rtol: float = 1e-5
) -> dict:
    """``make()(x, *rest)`` for float16 ``x`` against float32 ``x`` of the same values.

    A fresh loss is built for each run (losses with state or parameters start alike). Every
    tensor term is float32, finite and close to the float32 run's; the float16 input's
    gradient is finite and equals the float32 gradient rounded to float16. Returns the
    float16 run's output, detached.
    """
    assert half.dtype == torch.float16
    x16 = half.clone().requires_grad_()
    x32 = half.float().requires_grad_()
    out16 = make()(x16, *rest)
    out32 = make()(x32, *as_float32(list(rest)))
    for key, expected in out32.items():
        if not isinstance(expected, torch.Tensor):
            continue
        got = out16[key]
        assert got.dtype == torch.float32, f"{key}: {got.dtype}"
        assert bool(torch.isfinite(got)), f"{key}: {got}"
        torch.testing.assert_close(got, expected, rtol=rtol, atol=1e-6, msg=key)
    out16["loss"].backward()
    out32["loss"].backward()
    assert x16.grad is not None and x16.grad.dtype == torch.float16
    assert bool(torch.isfinite(x16.grad).all())
    torch.testing.assert_close(x16.grad.float(), x32.grad.half().float())
    return {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in out16.items()}


# --- SAR ------------------------------------------------------------------------------------


def make_sar(gate_open: bool) -> SemanticAnchorRegularizer:
    """SAR whose anchors the classifier rejects (a zero classifier: the gate stays shut) or
    solves (``W = 10 (A^+)^T``: anchor logits ``10 I``, so the gate opens at once)."""
    classifier = nn.Linear(D, C, bias=False)
    sar = SemanticAnchorRegularizer(
        C, D, classifier, projector=nn.Identity(), update_conf=0.5, seed=0
    )
    with torch.no_grad():
        solved = 10.0 * torch.linalg.pinv(sar.anchors).T
        classifier.weight.copy_(solved if gate_open else torch.zeros(C, D))
    return sar


@pytest.mark.parametrize("shape", [(N, D), (2, D, 8, 4)], ids=["flat", "dense"])
def test_sar_gate_shut_pull_is_exactly_zero_with_half_features(shape: tuple[int, ...]) -> None:
    features = big(*shape)
    assert torch.isinf(features.sum())  # the float16 sum itself overflows
    labels = class_labels(shape[0], *shape[2:])
    out = assert_half_matches_float32(lambda: make_sar(gate_open=False), features, labels)
    assert out["gate_open"] is False
    assert float(out["pull"]) == 0.0
    assert float(out["loss"]) == float(out["aux_ce"])  # aux_weight 1, pull 0


def test_sar_gate_shut_in_eval_mode_with_half_features() -> None:
    sar = make_sar(gate_open=False).eval()
    features = big(N, D).requires_grad_()
    out = sar(features, class_labels(N))
    out["loss"].backward()
    assert float(out["pull"].detach()) == 0.0 and out["pull"].dtype == torch.float32
    # the zero stays connected to the features (DDP sees every parameter used)
    assert features.grad is not None and bool((features.grad == 0).all())


@pytest.mark.parametrize("shape", [(N, D), (2, D, 8, 4)], ids=["flat", "dense"])
def test_sar_gate_open_pull_with_half_features(shape: tuple[int, ...]) -> None:
    labels = class_labels(shape[0], *shape[2:])
    out = assert_half_matches_float32(lambda: make_sar(gate_open=True), big(*shape), labels)
    assert out["gate_open"] is True
    assert float(out["pull"]) > HALF_MAX  # ||f - S[y]||^2 / D is about 9e4


# --- task losses on logits ------------------------------------------------------------------

COUNTS = [500, 120, 30, 6]


@pytest.mark.parametrize(
    "make",
    [
        CrossEntropyLoss,
        lambda: CrossEntropyLoss(label_smoothing=0.1),
        lambda: LogitAdjustedLoss(COUNTS),
        lambda: BalancedSoftmaxLoss(COUNTS),
    ],
    ids=["ce", "ce_smoothed", "logit_adjusted", "balanced_softmax"],
)
def test_task_losses_with_half_logits(make: Callable[[], nn.Module]) -> None:
    # 2 x 64 x 64 positions whose cross-entropies of about 300 sum to about 2e6
    logits = big(2, C, 64, 64) * torch.tensor([1.0, -1.0, 0.5, 0.0]).half()[:, None, None]
    labels = class_labels(2, 64, 64)
    labels[0, :4] = 255
    out = assert_half_matches_float32(make, logits, labels)
    assert float(out["loss"]) > 100.0


# --- feature-derived prototypes and the ETF regression --------------------------------------


def test_ema_prototypes_with_half_features() -> None:
    out = assert_half_matches_float32(lambda: EMAPrototypeLoss(C, D), big(N, D), class_labels(N))
    assert float(out["pull"]) > 0


def test_ema_prototypes_half_buffers_average_in_float32() -> None:
    # one class, 64 rows of about 1200: the class sum, 7.7e4, overflows float16
    features = big(N, D) * 4
    labels = torch.zeros(N, dtype=torch.long)
    half = EMAPrototypeLoss(C, D).half()
    out = half(features, labels)
    reference = EMAPrototypeLoss(C, D)
    expected = reference(features.float(), labels)
    assert half.prototypes.dtype == torch.float16
    torch.testing.assert_close(half.prototypes.float(), reference.prototypes.half().float())
    assert out["pull"].dtype == torch.float32 and bool(torch.isfinite(out["pull"]))
    # the prototype rounded to float16 (spacing 1 at 1200) moves the pull by well under 1%
    torch.testing.assert_close(out["pull"], expected["pull"], rtol=1e-2, atol=0.0)


@pytest.mark.parametrize("shape", [(N, D), (2, D, 8, 4)], ids=["flat", "dense"])
def test_center_loss_with_half_features(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    prototype = CenterLoss(C, D)
    out = assert_half_matches_float32(
        lambda: copy.deepcopy(prototype), big(*shape), class_labels(shape[0], *shape[2:])
    )
    assert float(out["center"]) > HALF_MAX


def test_dot_regression_with_half_features() -> None:
    etf = ETFClassifier(D, C)
    # squared row norms of about 5e7 overflow float16 if normalised there
    assert_half_matches_float32(lambda: DotRegressionLoss(etf.weight), big(N, D), class_labels(N))


# --- contrastive and PAUC --------------------------------------------------------------------


def granularities() -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    assignments = [torch.randint(k, (N,), generator=generator) for k in SIZES]
    prototypes = [unit(k, D, seed=10 + k) for k in SIZES]
    concentrations = [torch.full((k,), 0.05).half() for k in SIZES]
    return assignments, prototypes, concentrations


@pytest.mark.parametrize("with_queue", [False, True], ids=["batch", "queue"])
def test_infonce_with_half_embeddings(with_queue: bool) -> None:
    rest: list[Any] = [unit(N, D, seed=1)]
    if with_queue:
        rest.append(unit(4096, D, seed=2))
    assert_half_matches_float32(lambda: InfoNCE(temperature=0.05), unit(N, D), *rest)


def test_protonce_with_half_embeddings() -> None:
    def make() -> Callable[..., dict]:
        loss = ProtoNCE(num_negatives=3)
        return lambda q, *a: loss(q, *a, generator=torch.Generator().manual_seed(0))

    assert_half_matches_float32(make, unit(N, D), *granularities())


def test_alignment_and_uniformity_with_half_embeddings() -> None:
    assignments, prototypes, concentrations = granularities()
    assert_half_matches_float32(
        lambda: AlignmentLoss(alpha=1.5, view_weight=0.5),
        unit(N, D),
        assignments,
        prototypes,
        unit(N, D, seed=1),
    )
    for mode in ("batch_means", "assignment"):
        assert_half_matches_float32(
            lambda mode=mode: UniformityLoss(mode=mode),
            unit(N, D),
            assignments,
            prototypes,
            concentrations,
        )


@pytest.mark.parametrize("mode", ["barlow", "vicreg"])
def test_correlation_with_half_features(mode: str) -> None:
    # columns of magnitude about 300: their float16 variance (about 9e4) alone overflows
    z2 = big(N, 32, seed=1)
    out = assert_half_matches_float32(lambda: CorrelationLoss(mode=mode), big(N, 32), z2)
    assert float(out["loss"]) > 0


@pytest.mark.parametrize("corr_features", ["assignment", "batch_means"])
def test_pauc_with_half_embeddings(corr_features: str) -> None:
    def make() -> Callable[..., dict]:
        loss = PAUCLoss(num_negatives=3, align_view_weight=0.5, corr_features=corr_features)
        return lambda q, *a: loss(q, *a, generator=torch.Generator().manual_seed(0))

    out = assert_half_matches_float32(make, unit(N, D), *granularities(), unit(N, D, seed=1))
    assert set(out) == {"loss", "protonce", "alignment", "uniformity", "correlation"}


def test_empty_batches_give_float32_zeros_connected_to_half_inputs() -> None:
    q = torch.zeros(0, D, dtype=torch.float16, requires_grad=True)
    assignments = [torch.zeros(0, dtype=torch.long) for _ in SIZES]
    _, prototypes, concentrations = granularities()
    outs = [
        InfoNCE()(q, q),
        ProtoNCE()(q, assignments, prototypes, concentrations),
        PAUCLoss()(q, assignments, prototypes, concentrations),
    ]
    for out in outs:
        assert out["loss"].dtype == torch.float32 and float(out["loss"].detach()) == 0.0
    sum(out["loss"] for out in outs).backward()
    assert q.grad is not None and q.grad.shape == q.shape


# --- unit-norm checks of half-precision inputs ------------------------------------------------


def normalised_in(dtype: torch.dtype, *shape: int, seed: int = 0) -> torch.Tensor:
    """Rows normalised by ``F.normalize`` in ``dtype`` itself (as a model under autocast or
    with half weights gives them): their norms are 1 only to within the dtype's rounding."""
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(50.0 * torch.randn(*shape, generator=generator).to(dtype), dim=-1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_rows_normalised_in_half_precision_are_accepted(dtype: torch.dtype) -> None:
    q, k = normalised_in(dtype, N, D), normalised_in(dtype, N, D, seed=1)
    worst = float((q.float().norm(dim=-1) - 1).abs().max())
    if dtype == torch.bfloat16:
        assert worst > 1e-3  # the fixed float32 tolerance refused such rows
    assignments, _, concentrations = granularities()
    prototypes = [normalised_in(dtype, k_, D, seed=10 + k_) for k_ in SIZES]
    concentrations = [c.to(dtype) for c in concentrations]
    clusters = (assignments, prototypes, concentrations)
    outs = [
        InfoNCE()(q, k),
        InfoNCE()(q, k, normalised_in(dtype, 256, D, seed=2)),
        ProtoNCE(num_negatives=3)(q, *clusters, generator=torch.Generator().manual_seed(0)),
        PAUCLoss(num_negatives=3)(q, *clusters, k, generator=torch.Generator().manual_seed(0)),
    ]
    for out in outs:
        assert out["loss"].dtype == torch.float32 and bool(torch.isfinite(out["loss"]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rows_far_from_unit_norm_are_still_refused(dtype: torch.dtype) -> None:
    q = normalised_in(torch.float32, N, D)
    q[3] *= 1.1
    q = q.to(dtype)
    k = normalised_in(torch.float32, N, D, seed=1).to(dtype)
    with pytest.raises(ValueError, match=r"^q must be L2-normalised .* off by 0\.(1|099)"):
        InfoNCE()(q, k)
    assignments, prototypes, concentrations = granularities()
    with pytest.raises(ValueError, match=r"^q must be L2-normalised"):
        ProtoNCE()(q, assignments, prototypes, concentrations)
    with pytest.raises(ValueError, match=r"^q must be L2-normalised"):
        PAUCLoss()(q, assignments, prototypes, concentrations)


def test_the_unit_norm_tolerance_follows_the_dtype() -> None:
    from anchorlearn._checks import check_l2_normalised, unit_norm_tolerance

    assert unit_norm_tolerance(torch.float32) == unit_norm_tolerance(torch.float64) == 1e-3
    assert unit_norm_tolerance(torch.float16) == 4 * torch.finfo(torch.float16).eps
    assert unit_norm_tolerance(torch.bfloat16) == 4 * torch.finfo(torch.bfloat16).eps
    # float32 rows keep the float32 tolerance: a norm off by 2e-3 is refused
    rows = torch.tensor([[1.002, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match=r"row norms 1 \+- 0\.001\), got a row norm off by 0\.002"):
        check_l2_normalised(rows, "rows")
    check_l2_normalised(rows.to(torch.bfloat16), "rows")  # 1.002 rounds to bf16's 1.0
    check_l2_normalised(rows, "rows", atol=5e-3)  # an explicit tolerance still applies
