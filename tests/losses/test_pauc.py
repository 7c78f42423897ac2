"""PAUC terms (alignment, uniformity, correlation) and their combination, against loops."""

from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from anchorlearn.losses.contrastive import ProtoNCE
from anchorlearn.losses.pauc import (
    AlignmentLoss,
    CorrelationLoss,
    PAUCLoss,
    PAUCParameters,
    UniformityLoss,
    cluster_batch_means,
)

N, D = 10, 6
SIZES = (4, 7)
DTYPES = [torch.float32, torch.float64]
PAUC_KEYS = {"loss", "protonce", "alignment", "uniformity", "correlation"}


def unit(*shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, dtype=dtype), dim=-1)


def make_inputs(
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    q = unit(N, D, dtype=dtype)
    assignments = [torch.randint(kg, (N,)) for kg in SIZES]
    prototypes = [unit(kg, D, dtype=dtype) for kg in SIZES]
    concentrations = [(0.1 + 0.2 * torch.rand(kg)).to(dtype) for kg in SIZES]
    return q, assignments, prototypes, concentrations


def ref_uniformity(features: list[torch.Tensor], t: float) -> float | None:
    m = len(features)
    if m < 2:
        return None
    total = 0.0
    for j in range(m):
        for l in range(m):  # noqa: E741
            if j != l:
                total += math.exp(-t * float(((features[j] - features[l]) ** 2).sum()))
    return math.log(total / (m * (m - 1)))


def ref_batch_means(q: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    means = []
    for c in sorted(set(labels.tolist())):
        members = [q[i] for i in range(q.shape[0]) if int(labels[i]) == c]
        mean = sum(members) / len(members)
        means.append(mean / mean.norm())
    return means


def ref_assignment_vectors(
    q: torch.Tensor, protos: torch.Tensor, phi: torch.Tensor
) -> list[torch.Tensor]:
    vectors = []
    for i in range(q.shape[0]):
        scores = torch.tensor(
            [float(q[i] @ protos[j]) / float(phi[j]) for j in range(len(phi))],
            dtype=torch.float64,
        )
        e = torch.exp(scores - scores.max())
        vectors.append(e / e.sum())
    return vectors


def ref_barlow(z1: torch.Tensor, z2: torch.Tensor, lam: float, eps: float = 1e-5) -> float:
    m, p = z1.shape

    def standardise(z: torch.Tensor) -> torch.Tensor:
        cols = []
        for c in range(p):
            col = z[:, c]
            mean = sum(col.tolist()) / m
            var = sum((v - mean) ** 2 for v in col.tolist()) / m
            cols.append([(v - mean) / math.sqrt(var + eps) for v in col.tolist()])
        return torch.tensor(cols, dtype=torch.float64).t()

    a, b = standardise(z1), standardise(z2)
    total = 0.0
    for i in range(p):
        for j in range(p):
            c_ij = sum(float(a[r, i] * b[r, j]) for r in range(m)) / m
            total += (1 - c_ij) ** 2 if i == j else lam * c_ij**2
    return total / p


def ref_vicreg_cov(z: torch.Tensor) -> float:
    m, p = z.shape
    mean = [sum(z[:, c].tolist()) / m for c in range(p)]
    total = 0.0
    for i in range(p):
        for j in range(p):
            if i != j:
                cov = sum((float(z[r, i]) - mean[i]) * (float(z[r, j]) - mean[j]) for r in range(m))
                total += (cov / (m - 1)) ** 2
    return total / p


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("alpha", "view_weight"), [(2.0, 0.0), (1.0, 0.5), (3.0, 2.0)])
def test_alignment_matches_loop(dtype: torch.dtype, alpha: float, view_weight: float) -> None:
    q, assignments, prototypes, _ = make_inputs(dtype)
    k = unit(N, D, dtype=dtype)
    out = AlignmentLoss(alpha, view_weight)(q, assignments, prototypes, k)
    assert set(out) == {"loss", "alignment", "view_alignment"}
    per_gran = []
    for labels, protos in zip(assignments, prototypes, strict=True):
        dists = [float((q[i] - protos[int(labels[i])]).norm()) ** alpha for i in range(N)]
        per_gran.append(sum(dists) / N)
    proto_term = sum(per_gran) / len(per_gran)
    view_term = sum(float((q[i] - k[i]).norm()) ** alpha for i in range(N)) / N
    tol = 1e-5 if dtype == torch.float32 else 1e-9
    assert math.isclose(float(out["alignment"]), proto_term, rel_tol=tol)
    expected_view = view_term if view_weight > 0 else 0.0
    assert math.isclose(float(out["view_alignment"]), expected_view, rel_tol=tol, abs_tol=tol)
    assert math.isclose(float(out["loss"]), proto_term + view_weight * expected_view, rel_tol=tol)


def test_alignment_rejects_bad_input() -> None:
    q, assignments, prototypes, _ = make_inputs()
    with pytest.raises(ValueError, match="q must be L2-normalised"):
        AlignmentLoss()(2 * q, assignments, prototypes)
    with pytest.raises(ValueError, match=r"prototypes\[1\] must be L2-normalised"):
        AlignmentLoss()(q, assignments, [prototypes[0], 3 * prototypes[1]])
    with pytest.raises(ValueError, match=r"k .* is required with view_weight > 0"):
        AlignmentLoss(view_weight=1.0)(q, assignments, prototypes)
    with pytest.raises(ValueError, match="alpha must be finite and > 0"):
        AlignmentLoss(alpha=0.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_uniformity_batch_means_matches_loop(dtype: torch.dtype) -> None:
    q, assignments, _, _ = make_inputs(dtype)
    assignments[0] = torch.tensor([0, 0, 3, 3, 3, 0, 0, 3, 0, 3])  # clusters 1, 2 absent
    out = UniformityLoss(t=2.0, mode="batch_means")(q, assignments)
    terms = [ref_uniformity(ref_batch_means(q.double(), a), 2.0) for a in assignments]
    expected = sum(terms) / len(terms)
    tol = 1e-5 if dtype == torch.float32 else 1e-9
    assert math.isclose(float(out["uniformity"]), expected, rel_tol=tol)
    assert torch.equal(out["loss"], out["uniformity"])


def test_cluster_batch_means_skips_absent_clusters() -> None:
    q = unit(N, D)
    labels = torch.tensor([5, 5, 2, 2, 2, 5, 9, 9, 2, 5])
    means, ids = cluster_batch_means(q, labels)
    assert ids.tolist() == [2, 5, 9]
    for mean, ref in zip(means, ref_batch_means(q, labels), strict=True):
        torch.testing.assert_close(mean, ref)


@pytest.mark.parametrize("t", [2.0, 0.5])
def test_uniformity_assignment_matches_loop(t: float) -> None:
    q, assignments, prototypes, concentrations = make_inputs()
    out = UniformityLoss(t=t, mode="assignment")(q, assignments, prototypes, concentrations)
    terms = [
        ref_uniformity(ref_assignment_vectors(q, p, c), t)
        for p, c in zip(prototypes, concentrations, strict=True)
    ]
    assert math.isclose(float(out["loss"]), sum(terms) / len(terms), rel_tol=1e-9)


def test_uniformity_single_cluster_is_zero_with_finite_gradient() -> None:
    q = unit(N, D).requires_grad_()
    out = UniformityLoss()(q, [torch.zeros(N, dtype=torch.long)])
    assert float(out["loss"].detach()) == 0.0
    out["loss"].backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_uniformity_gradient_finite_with_identical_features() -> None:
    q = unit(1, D).repeat(N, 1).requires_grad_()
    protos = [unit(3, D)]
    out = UniformityLoss(mode="assignment")(q, [torch.zeros(N, dtype=torch.long)], protos)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and torch.isfinite(q.grad).all()


def test_uniformity_rejects_bad_input() -> None:
    q, assignments, _, _ = make_inputs()
    with pytest.raises(ValueError, match="prototypes are required"):
        UniformityLoss(mode="assignment")(q, assignments)
    with pytest.raises(ValueError, match="mode must be one of"):
        UniformityLoss(mode="centroids")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"assignments\[0\] must be >= 0"):
        UniformityLoss()(q, [assignments[0] - 10])


@pytest.mark.parametrize("lam", [5e-3, 0.5])
def test_barlow_matches_loop(lam: float) -> None:
    z1, z2 = torch.randn(9, 5, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64)
    out = CorrelationLoss("barlow", lam)(z1, z2)
    assert set(out) == {"loss", "correlation"}
    assert math.isclose(float(out["loss"]), ref_barlow(z1, z2, lam), rel_tol=1e-9)


def test_barlow_perfectly_correlated_decorrelated_features_give_zero() -> None:
    z = torch.linalg.qr(torch.randn(20, 4, dtype=torch.float64))[0]  # orthogonal columns
    z = (z - z.mean(0)) * math.sqrt(20)
    out = CorrelationLoss("barlow", 1.0, eps=1e-12)(z, z)
    assert float(out["loss"]) < 0.05


def test_vicreg_matches_loop() -> None:
    z1, z2 = torch.randn(9, 5, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64)
    both = CorrelationLoss("vicreg")(z1, z2)["loss"]
    one = CorrelationLoss("vicreg")(z1)["loss"]
    assert math.isclose(float(both), (ref_vicreg_cov(z1) + ref_vicreg_cov(z2)) / 2, rel_tol=1e-9)
    assert math.isclose(float(one), ref_vicreg_cov(z1), rel_tol=1e-9)


def test_correlation_degenerate_and_bad_input() -> None:
    z = torch.randn(1, 4, requires_grad=True)
    out = CorrelationLoss()(z, torch.randn(1, 4))
    assert float(out["loss"].detach()) == 0.0 and out["loss"].requires_grad
    constant = torch.ones(6, 3, requires_grad=True)
    out = CorrelationLoss()(constant, torch.randn(6, 3))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and torch.isfinite(constant.grad).all()
    with pytest.raises(ValueError, match=r"z2 .* is required for 'barlow'"):
        CorrelationLoss("barlow")(torch.randn(4, 3))
    with pytest.raises(ValueError, match="z2 must have shape"):
        CorrelationLoss("vicreg")(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="lambda_offdiag must be finite and >= 0"):
        CorrelationLoss(lambda_offdiag=-1.0)


@pytest.mark.parametrize("corr_features", ["assignment", "batch_means"])
@pytest.mark.parametrize("uniform_mode", ["batch_means", "assignment"])
def test_pauc_is_weighted_sum_of_the_separate_losses(corr_features: str, uniform_mode: str) -> None:
    q, assignments, prototypes, concentrations = make_inputs()
    k = unit(N, D)
    weights = {"protonce": 0.7, "alignment": 0.3, "uniformity": 0.2, "correlation": 0.1}
    pauc = PAUCLoss(
        num_negatives=100,
        protonce_weight=weights["protonce"],
        align_weight=weights["alignment"],
        uniform_weight=weights["uniformity"],
        corr_weight=weights["correlation"],
        align_view_weight=0.5,
        uniform_mode=uniform_mode,  # type: ignore[arg-type]
        corr_features=corr_features,  # type: ignore[arg-type]
    )
    out = pauc(q, assignments, prototypes, concentrations, k=k)
    assert set(out) == PAUC_KEYS
    expected = {
        "protonce": ProtoNCE(num_negatives=100)(q, assignments, prototypes, concentrations)["loss"],
        "alignment": AlignmentLoss(2.0, 0.5)(q, assignments, prototypes, k)["loss"],
        "uniformity": UniformityLoss(2.0, uniform_mode)(  # type: ignore[arg-type]
            q, assignments, prototypes, concentrations
        )["loss"],
    }
    corr_terms = []
    for labels, protos, phi in zip(assignments, prototypes, concentrations, strict=True):
        if corr_features == "assignment":
            z1 = torch.stack(ref_assignment_vectors(q, protos, phi))
            z2 = torch.stack(ref_assignment_vectors(k, protos, phi))
        else:
            z1 = torch.stack(ref_batch_means(q, labels))
            z2 = torch.stack(ref_batch_means(k, labels))
        corr_terms.append(ref_barlow(z1, z2, 5e-3))
    expected["correlation"] = torch.tensor(sum(corr_terms) / len(corr_terms))
    for name, value in expected.items():
        assert math.isclose(float(out[name]), float(value), rel_tol=1e-7), name
    total = sum(weights[name] * float(value) for name, value in expected.items())
    assert math.isclose(float(out["loss"]), total, rel_tol=1e-7)


def test_pauc_zero_weights_keep_every_key_at_zero() -> None:
    q, assignments, prototypes, concentrations = make_inputs()
    q.requires_grad_()
    only_protonce = PAUCLoss(align_weight=0, uniform_weight=0, corr_weight=0)
    out = only_protonce(q, assignments, prototypes, concentrations)  # no k needed
    assert set(out) == PAUC_KEYS
    for name in ("alignment", "uniformity", "correlation"):
        assert float(out[name].detach()) == 0.0
    torch.testing.assert_close(out["loss"], out["protonce"])
    none = PAUCLoss(protonce_weight=0, align_weight=0, uniform_weight=0, corr_weight=0)
    out = none(q, assignments, prototypes, concentrations)
    assert set(out) == PAUC_KEYS and float(out["loss"].detach()) == 0.0
    out["loss"].backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_empty_batch_gives_zero_with_a_graph_in_every_ssl_loss() -> None:
    from anchorlearn.losses.contrastive import InfoNCE

    _, _, prototypes, concentrations = make_inputs()
    q = unit(0, D).requires_grad_()
    k = unit(0, D)
    assignments = [torch.zeros(0, dtype=torch.long) for _ in SIZES]
    outputs = [
        InfoNCE()(q, k),
        InfoNCE()(q, k, queue=unit(5, D)),
        ProtoNCE()(q, assignments, prototypes, concentrations),
        PAUCLoss()(q, assignments, prototypes, concentrations, k=k),
        AlignmentLoss()(q, assignments, prototypes, k=k),
        UniformityLoss()(q, assignments, prototypes),
        CorrelationLoss()(q, k),
    ]
    for out in outputs:
        assert all(float(v.detach()) == 0.0 for v in out.values() if torch.is_tensor(v))
        out["loss"].backward()
        assert q.grad is not None and torch.equal(q.grad, torch.zeros_like(q))
    assert set(outputs[3]) == PAUC_KEYS


def test_pauc_gradient_finite_float32() -> None:
    q, assignments, prototypes, concentrations = make_inputs(torch.float32)
    q.requires_grad_()
    out = PAUCLoss(num_negatives=3)(
        q, assignments, prototypes, concentrations, k=unit(N, D, dtype=torch.float32)
    )
    out["loss"].backward()
    assert all(torch.isfinite(v) for v in out.values())
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


def test_pauc_rejects_bad_input() -> None:
    q, assignments, prototypes, concentrations = make_inputs()
    with pytest.raises(ValueError, match=r"k .* is required when corr_weight > 0"):
        PAUCLoss()(q, assignments, prototypes, concentrations)
    with pytest.raises(ValueError, match="k must have shape"):
        PAUCLoss()(q, assignments, prototypes, concentrations, k=unit(N + 1, D))
    with pytest.raises(ValueError, match="q must be L2-normalised"):
        PAUCLoss()(q * 3, assignments, prototypes, concentrations, k=q)
    with pytest.raises(ValueError, match="corr_weight must be finite and >= 0"):
        PAUCLoss(corr_weight=-1.0)
    with pytest.raises(ValueError, match="corr_features must be one of"):
        PAUCLoss(corr_features="centroids")  # type: ignore[arg-type]


# --- the parameters, in one place ---------------------------------------------------------


def test_pauc_parameters_are_the_loss_arguments_with_the_same_defaults() -> None:
    signature = inspect.signature(PAUCLoss.__init__).parameters
    arguments = {name: p.default for name, p in signature.items() if name != "self"}
    assert arguments.pop("temperature") == 0.2
    fields = {f.name: f.default for f in dataclasses.fields(PAUCParameters)}
    assert arguments == fields
    assert fields["num_negatives"] == 16000 and fields["corr_lambda"] == 5e-3


def _state(loss: PAUCLoss) -> dict:
    return {
        "temperature": loss.protonce.temperature,
        "num_negatives": loss.protonce.num_negatives,
        "weights": loss.weights,
        "alignment": (loss.alignment.alpha, loss.alignment.view_weight),
        "uniformity": (loss.uniformity.t, loss.uniformity.mode, loss.uniformity.temperature),
        "correlation": (loss.correlation.mode, loss.correlation.lambda_offdiag),
        "corr_features": loss.corr_features,
    }


def test_pauc_from_params_matches_the_constructor() -> None:
    chosen = {
        "protonce_weight": 0.5,
        "align_weight": 0.25,
        "uniform_weight": 0.0,
        "corr_weight": 2.0,
        "num_negatives": 7,
        "align_alpha": 1.5,
        "align_view_weight": 0.3,
        "uniform_t": 3.0,
        "uniform_mode": "assignment",
        "corr_mode": "vicreg",
        "corr_lambda": 0.01,
        "corr_features": "batch_means",
    }
    expected = _state(PAUCLoss(0.1, **chosen))
    assert _state(PAUCLoss.from_params(PAUCParameters(**chosen), temperature=0.1)) == expected
    assert _state(PAUCLoss.from_params(chosen, temperature=0.1)) == expected
    # a mapping sets some parameters, the others keep their defaults
    partial = PAUCLoss.from_params({"corr_weight": 0.0})
    assert _state(partial) == _state(PAUCLoss(corr_weight=0.0))
    q, assignments, prototypes, concentrations = make_inputs()
    torch.manual_seed(0)
    inputs = (q, assignments, prototypes, concentrations)
    out = PAUCLoss.from_params(chosen, temperature=0.1)(*inputs, k=q)
    torch.manual_seed(0)
    reference = PAUCLoss(0.1, **chosen)(*inputs, k=q)
    assert {name: float(v) for name, v in out.items()} == {
        name: float(v) for name, v in reference.items()
    }


def test_pauc_from_params_reads_only_the_pauc_fields_of_an_extended_class() -> None:
    @dataclasses.dataclass
    class WithMore(PAUCParameters):
        infonce_weight: float = 9.0

    loss = PAUCLoss.from_params(WithMore(align_weight=0.5, infonce_weight=3.0))
    assert _state(loss) == _state(PAUCLoss(align_weight=0.5))


def test_pauc_from_params_refuses_unknown_names_and_other_types() -> None:
    with pytest.raises(ValueError) as info:
        PAUCLoss.from_params({"corr_weight": 1.0, "allign_weight": 1.0})
    allowed = ", ".join(f.name for f in dataclasses.fields(PAUCParameters))
    assert str(info.value) == f"unknown PAUCLoss parameter 'allign_weight'; allowed: {allowed}"
    with pytest.raises(ValueError, match="unknown PAUCLoss parameter 'temperature'"):
        PAUCLoss.from_params({"temperature": 0.1})  # a keyword of its own
    with pytest.raises(TypeError, match="params must be a PAUCParameters or a mapping, got list"):
        PAUCLoss.from_params([("corr_weight", 1.0)])  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"mode must be one of \('batch_means', 'assignment'\), got 'centr"
    ):
        PAUCLoss.from_params({"uniform_mode": "centroids"})


@pytest.mark.parametrize("alpha", [2.0, 1.0])
def test_alignment_modes_match_loops(alpha: float) -> None:
    q, assignments, prototypes, _ = make_inputs()
    k = unit(N, D)
    views = AlignmentLoss(alpha, mode="views")(q, assignments, prototypes, k)
    view_term = sum(float((q[i] - k[i]).norm()) ** alpha for i in range(N)) / N
    assert math.isclose(float(views["loss"]), view_term, rel_tol=1e-9)
    assert math.isclose(float(views["view_alignment"]), view_term, rel_tol=1e-9)
    pairs = AlignmentLoss(alpha, mode="pairs")(q, assignments, prototypes, k)
    per_gran = []
    for labels in assignments:
        per_sample = []
        for i in range(N):
            mates = [j for j in range(N) if int(labels[j]) == int(labels[i])]
            assert i in mates
            per_sample.append(sum(float((q[i] - k[j]).norm()) ** alpha for j in mates) / len(mates))
        per_gran.append(sum(per_sample) / N)
    expected = sum(per_gran) / len(per_gran)
    assert math.isclose(float(pairs["alignment"]), expected, rel_tol=1e-7)
    assert math.isclose(float(pairs["loss"]), expected, rel_tol=1e-7)


def test_pair_alignment_of_singleton_clusters_is_view_alignment() -> None:
    q, k = unit(N, D), unit(N, D)
    distinct = [torch.arange(N) for _ in SIZES]
    prototypes = [unit(N, D) for _ in SIZES]
    pairs = AlignmentLoss(mode="pairs")(q, distinct, prototypes, k)
    views = AlignmentLoss(mode="views")(q, distinct, prototypes, k)
    assert math.isclose(float(pairs["loss"]), float(views["loss"]), rel_tol=1e-9)


def test_alignment_modes_need_the_second_view_and_refuse_a_double_view_term() -> None:
    q, assignments, prototypes, concentrations = make_inputs()
    for mode in ("views", "pairs"):
        with pytest.raises(ValueError, match=f"k .*required with mode='{mode}'"):
            AlignmentLoss(mode=mode)(q, assignments, prototypes)
        with pytest.raises(ValueError, match="required when align_view_weight > 0 or align_mode"):
            PAUCLoss(align_mode=mode, corr_weight=0.0)(q, assignments, prototypes, concentrations)
    with pytest.raises(ValueError, match="mode='views' is that term alone"):
        AlignmentLoss(view_weight=0.5, mode="views")
    with pytest.raises(ValueError, match="mode"):
        AlignmentLoss(mode="cluster")


def test_pauc_alignment_mode_sends_a_gradient_to_the_queries_only_through_its_term() -> None:
    q, assignments, prototypes, concentrations = make_inputs(torch.float32)
    q.requires_grad_(True)
    k = unit(N, D, dtype=torch.float32)
    loss = PAUCLoss.from_params(
        {"align_mode": "pairs", "protonce_weight": 0.0, "uniform_weight": 0.0, "corr_weight": 0.0}
    )
    out = loss(q, assignments, prototypes, concentrations, k=k)
    direct = AlignmentLoss(mode="pairs")(q.detach(), assignments, prototypes, k)["loss"]
    assert math.isclose(float(out["loss"].detach()), float(direct), rel_tol=1e-6)
    out["loss"].backward()
    assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
