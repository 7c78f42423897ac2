"""InfoNCE and ProtoNCE against loop implementations written out from their definitions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from anchorlearn.losses.contrastive import InfoNCE, ProtoNCE

N, D = 12, 8
DTYPES = [torch.float32, torch.float64]


def unit(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, dtype=dtype), dim=-1)


def log_softmax_first(scores: list[torch.Tensor]) -> torch.Tensor:
    """-log(exp(s_0) / sum_j exp(s_j)), written with an explicit sum."""
    total = sum(torch.exp(s) for s in scores)
    return -torch.log(torch.exp(scores[0]) / total)


def reference_infonce(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor | None, tau: float
) -> torch.Tensor:
    q, k = q.double(), k.double()
    terms = []
    for i in range(q.shape[0]):
        pos = torch.dot(q[i], k[i]) / tau
        if queue is None:
            negs = [torch.dot(q[i], k[j]) / tau for j in range(k.shape[0]) if j != i]
        else:
            negs = [torch.dot(q[i], n.double()) / tau for n in queue]
        terms.append(log_softmax_first([pos, *negs]))
    return torch.stack(terms).mean()


def reference_protonce_all_negatives(
    q: torch.Tensor,
    assignments: list[torch.Tensor],
    prototypes: list[torch.Tensor],
    concentrations: list[torch.Tensor],
) -> torch.Tensor:
    """ProtoNCE where every other prototype is a negative (no sampling involved)."""
    q = q.double()
    per_granularity = []
    for labels, protos, phi in zip(assignments, prototypes, concentrations, strict=True):
        terms = []
        for i in range(q.shape[0]):
            s = int(labels[i])
            scores = [torch.dot(q[i], protos[s].double()) / float(phi[s])]
            for j in range(protos.shape[0]):
                if j != s:
                    scores.append(torch.dot(q[i], protos[j].double()) / float(phi[j]))
            terms.append(log_softmax_first(scores))
        per_granularity.append(torch.stack(terms).mean())
    return torch.stack(per_granularity).mean()


def make_granularities(
    n: int = N, sizes: tuple[int, ...] = (5, 9), dtype: torch.dtype = torch.float32
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    assignments = [torch.randint(kg, (n,)) for kg in sizes]
    prototypes = [unit(kg, D, dtype=dtype) for kg in sizes]
    concentrations = [(0.1 + 0.3 * torch.rand(kg)).to(dtype) for kg in sizes]
    return assignments, prototypes, concentrations


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_queue", [True, False])
def test_infonce_matches_loop(dtype: torch.dtype, use_queue: bool) -> None:
    q, k = unit(N, D, dtype=dtype), unit(N, D, dtype=dtype)
    queue = unit(7, D, dtype=dtype) if use_queue else None
    out = InfoNCE(temperature=0.3)(q, k, queue)
    assert set(out) == {"loss", "infonce"}
    expected = reference_infonce(q, k, queue, 0.3)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(out["loss"].double(), expected, rtol=tol, atol=tol)


def test_infonce_gradient_and_single_sample() -> None:
    q = unit(N, D).requires_grad_()
    out = InfoNCE()(q, unit(N, D), unit(5, D))
    out["loss"].backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    single = InfoNCE()(unit(1, D), unit(1, D))["loss"]
    assert float(single) == 0.0


@pytest.mark.parametrize(
    ("q", "k", "queue", "match"),
    [
        (torch.ones(4, D), unit(4, D), None, "q must be L2-normalised"),
        (unit(4, D), unit(3, D), None, "k must have shape"),
        (unit(4, D), unit(4, D), unit(5, D + 1), "queue must have 8 columns"),
        (unit(4, D), 2 * unit(4, D), None, "k must be L2-normalised"),
        (unit(4, D).fill_(float("nan")), unit(4, D), None, "q must be finite"),
    ],
)
def test_infonce_rejects_bad_input(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor | None, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        InfoNCE()(q, k, queue)


def test_infonce_rejects_bad_types_and_temperature() -> None:
    with pytest.raises(TypeError, match="q must be a floating-point tensor"):
        InfoNCE()(torch.ones(4, D, dtype=torch.long), unit(4, D))
    for bad in (0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature must be finite and > 0"):
            InfoNCE(temperature=bad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_protonce_with_all_negatives_matches_loop(dtype: torch.dtype) -> None:
    q = unit(N, D, dtype=dtype)
    assignments, prototypes, concentrations = make_granularities(dtype=dtype)
    out = ProtoNCE(num_negatives=100)(q, assignments, prototypes, concentrations)
    assert set(out) == {"loss", "protonce"}
    expected = reference_protonce_all_negatives(q, assignments, prototypes, concentrations)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(out["protonce"].double(), expected, rtol=tol, atol=tol)


def test_protonce_with_sampled_negatives_matches_loop() -> None:
    q = unit(N, D, dtype=torch.float64)
    assignments, prototypes, concentrations = make_granularities(dtype=torch.float64)
    loss_fn = ProtoNCE(num_negatives=3)
    out = loss_fn(q, assignments, prototypes, concentrations, torch.Generator().manual_seed(5))

    replay = torch.Generator().manual_seed(5)
    per_granularity = []
    for labels, protos, phi in zip(assignments, prototypes, concentrations, strict=True):
        negatives = loss_fn.sample_negatives(labels, protos.shape[0], replay)
        terms = []
        for i in range(N):
            s = int(labels[i])
            scores = [torch.dot(q[i], protos[s]) / float(phi[s])]
            scores += [torch.dot(q[i], protos[int(j)]) / float(phi[int(j)]) for j in negatives[i]]
            terms.append(log_softmax_first(scores))
        per_granularity.append(torch.stack(terms).mean())
    torch.testing.assert_close(out["loss"], torch.stack(per_granularity).mean())


def test_protonce_without_concentrations_uses_temperature() -> None:
    q = unit(N, D)
    assignments, prototypes, _ = make_granularities()
    flat = [torch.full((p.shape[0],), 0.25) for p in prototypes]
    loss_fn = ProtoNCE(temperature=0.25, num_negatives=50)
    torch.testing.assert_close(
        loss_fn(q, assignments, prototypes)["loss"],
        loss_fn(q, assignments, prototypes, flat)["loss"],
    )


@pytest.mark.parametrize(("num_negatives", "k"), [(3, 10), (9, 10), (50, 10), (4, 1)])
def test_sampled_negatives_exclude_positive_and_never_exceed(num_negatives: int, k: int) -> None:
    positives = torch.randint(k, (64,))
    idx = ProtoNCE(num_negatives=num_negatives).sample_negatives(
        positives, k, torch.Generator().manual_seed(0)
    )
    assert idx.shape == (64, min(num_negatives, k - 1))
    for row, pos in zip(idx, positives, strict=True):
        assert len(set(row.tolist())) == row.numel()  # without replacement
        assert int(pos) not in row.tolist()
        assert all(0 <= j < k for j in row.tolist())


def test_sampled_negatives_reproducible_and_uniform() -> None:
    loss_fn = ProtoNCE(num_negatives=4)
    positives = torch.zeros(4000, dtype=torch.long)
    a = loss_fn.sample_negatives(positives, 9, torch.Generator().manual_seed(1))
    b = loss_fn.sample_negatives(positives, 9, torch.Generator().manual_seed(1))
    c = loss_fn.sample_negatives(positives, 9, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    freq = torch.bincount(a.flatten(), minlength=9).double() / a.numel()
    assert freq[0] == 0
    torch.testing.assert_close(freq[1:], torch.full((8,), 1 / 8).double(), atol=0.01, rtol=0)


def test_protonce_seeded_loss_is_reproducible() -> None:
    q = unit(N, D)
    grans = make_granularities(sizes=(30,))
    loss_fn = ProtoNCE(num_negatives=5)
    runs = [loss_fn(q, *grans, torch.Generator().manual_seed(3))["loss"] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_protonce_single_prototype_is_zero_and_finite_gradient() -> None:
    q = unit(N, D).requires_grad_()
    out = ProtoNCE()(q, [torch.zeros(N, dtype=torch.long)], [unit(1, D)], [torch.ones(1) * 0.2])
    assert float(out["loss"].detach()) == 0.0
    out = ProtoNCE(num_negatives=4)(q, *make_granularities())
    out["loss"].backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_protonce_under_autocast_close_to_float32() -> None:
    q = unit(N, D)
    grans = make_granularities()
    loss_fn = ProtoNCE(num_negatives=100)
    ref = loss_fn(q, *grans)["loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = loss_fn(q, *grans)["loss"]
    assert torch.isfinite(low)
    assert math.isclose(float(low), float(ref), rel_tol=5e-2)


def test_protonce_rejects_bad_input() -> None:
    q = unit(N, D)
    a, p, c = make_granularities()
    loss_fn = ProtoNCE()
    with pytest.raises(ValueError, match="q must be L2-normalised"):
        loss_fn(q * 1.01, a, p, c)
    with pytest.raises(ValueError, match=r"assignments\[0\] must lie in \[0, 5\)"):
        loss_fn(q, [a[0] + 5, a[1]], p, c)
    with pytest.raises(ValueError, match=r"assignments\[1\] must have shape \(12,\)"):
        loss_fn(q, [a[0], a[1][:3]], p, c)
    with pytest.raises(ValueError, match="one tensor per granularity"):
        loss_fn(q, a, p[:1], c)
    with pytest.raises(ValueError, match=r"concentrations\[0\] must be >= .* got minimum -"):
        loss_fn(q, a, p, [-c[0], c[1]])
    with pytest.raises(ValueError, match=r"prototypes\[1\] must be L2-normalised"):
        loss_fn(q, a, [p[0], p[1] * 5.0], c)
    with pytest.raises(ValueError, match=r"prototypes\[0\] must be L2-normalised"):
        loss_fn(q, a, [torch.zeros_like(p[0]), p[1]], c)
    with pytest.raises(ValueError, match=r"concentrations\[1\] must have shape \(9,\)"):
        loss_fn(q, a, p, [c[0], c[1][:2]])
    with pytest.raises(ValueError, match=r"prototypes\[0\] must be finite"):
        loss_fn(q, a, [torch.full_like(p[0], float("nan")), p[1]], c)
    with pytest.raises(TypeError, match=r"assignments\[0\] must be an integer tensor"):
        loss_fn(q, [a[0].float(), a[1]], p, c)
    with pytest.raises(TypeError, match="assignments must be a list"):
        loss_fn(q, a[0], p, c)
    with pytest.raises(ValueError, match="at least one granularity"):
        loss_fn(q, [], [], [])
    with pytest.raises(ValueError, match="num_negatives must be >= 1"):
        ProtoNCE(num_negatives=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_concentrations_down_to_the_floor_give_finite_loss_and_gradient(
    dtype: torch.dtype,
) -> None:
    floor = torch.finfo(dtype).max ** -0.5
    q = unit(N, D).to(dtype).requires_grad_()
    a, p, c = make_granularities()
    p = [proto.to(dtype) for proto in p]
    tiny = [torch.full(phi.shape, floor * 1.001, dtype=dtype) for phi in c]
    out = ProtoNCE()(q, a, p, tiny)
    out["loss"].float().backward()
    assert torch.isfinite(out["loss"]) and bool(torch.isfinite(q.grad).all())
    # below the floor (1e-39 in float32 is a subnormal whose inverse overflows): an error
    below = [torch.full(phi.shape, floor / 10, dtype=dtype) for phi in c]
    with pytest.raises(ValueError, match=r"concentrations\[0\] must be >= .* overflow"):
        ProtoNCE()(q, a, p, below)


@settings(max_examples=25, deadline=None)
@given(scale=st.floats(0.0, 10.0).filter(lambda s: abs(s - 1.0) > 2e-3))
def test_unnormalised_q_is_rejected(scale: float) -> None:
    q = unit(4, D) * scale
    a, p, c = make_granularities(n=4)
    with pytest.raises(ValueError, match="q must be L2-normalised"):
        ProtoNCE()(q, a, p, c)
    with pytest.raises(ValueError, match="q must be L2-normalised"):
        InfoNCE()(q, unit(4, D))
