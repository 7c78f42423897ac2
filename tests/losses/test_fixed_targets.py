"""The fixed-target baselines: TSC-style targets with a Hungarian assignment, CeCo-style
centre classification by a fixed simplex ETF."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from anchorlearn._geometry import riesz_uniform_points, simplex_etf
from anchorlearn.losses import CenterCollapseLoss, TargetedContrastiveLoss
from anchorlearn.losses import fixed_targets as module

IGNORE = 255


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def hand_ce(logits: list[float], target: int) -> float:
    top = max(logits)
    return -(logits[target] - top) + math.log(sum(math.exp(v - top) for v in logits))


def hand_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().tolist(), b.double().tolist()
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def tsc_by_loops(
    loss: TargetedContrastiveLoss, features: torch.Tensor, labels: torch.Tensor
) -> float:
    """Mean over non-ignored rows of CE(cos(f, T_j) / tau, assignment[y]), in plain Python."""
    total, count = 0.0, 0
    for f, y in zip(features, labels.tolist(), strict=True):
        if y == loss.ignore_index:
            continue
        logits = [hand_cos(f, t) / loss.temperature for t in loss.targets]
        total += hand_ce(logits, int(loss.assignment[y]))
        count += 1
    return total / count


def ceco_by_loops(loss: CenterCollapseLoss, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over present classes of CE(s * cos(mean_c, E_j), c), in plain Python."""
    total, present = 0.0, 0
    for c in range(loss.num_classes):
        rows = [f.double() for f, y in zip(features, labels.tolist(), strict=True) if y == c]
        if not rows:
            continue
        centre = sum(rows) / len(rows)
        logits = [loss.scale * hand_cos(centre, e) for e in loss.etf]
        total += hand_ce(logits, c)
        present += 1
    return total / present


def features_at(points: torch.Tensor, labels: list[int], scale: float = 3.0) -> torch.Tensor:
    """One feature per label, at ``scale`` times the point of that label's row."""
    return scale * points[torch.tensor(labels)]


# --------------------------------------------------------------------------------------------
# TargetedContrastiveLoss
# --------------------------------------------------------------------------------------------


def test_tsc_targets_are_the_seeded_riesz_points() -> None:
    loss = TargetedContrastiveLoss(5, 4, seed=3)
    expected = riesz_uniform_points(5, 4, seed=3).float()
    assert loss.targets.dtype == torch.float32
    torch.testing.assert_close(loss.targets, expected, rtol=0, atol=0)
    torch.testing.assert_close(loss.targets.norm(dim=1), torch.ones(5))
    assert not torch.equal(TargetedContrastiveLoss(5, 4, seed=4).targets, loss.targets)
    assert loss.assignment.tolist() == [0, 1, 2, 3, 4]
    assert int(loss.step) == 0
    assert list(loss.parameters()) == []


@pytest.mark.parametrize("assignment", [[0, 1, 2], [2, 0, 1]])
def test_tsc_loss_matches_a_hand_loop(assignment: list[int]) -> None:
    loss = TargetedContrastiveLoss(3, 4, temperature=0.5, weight=2.0, seed=1).eval()
    loss.assignment.copy_(torch.tensor(assignment))
    features = randn(7, 4)
    labels = torch.tensor([0, 2, IGNORE, 1, 1, 0, 2])
    out = loss(features, labels)
    expected = tsc_by_loops(loss, features, labels)
    assert set(out) == {"loss", "target_ce"}
    assert float(out["target_ce"]) == pytest.approx(expected, rel=1e-5)
    assert float(out["loss"]) == pytest.approx(2.0 * expected, rel=1e-5)
    # eval mode leaves every buffer as it was
    assert int(loss.step) == 0 and not bool(loss.initialized.any())


def test_tsc_hungarian_recovers_the_permutation_of_the_targets() -> None:
    loss = TargetedContrastiveLoss(5, 8, seed=0)
    perm = [2, 0, 4, 1, 3]  # class c sits exactly at target perm[c]
    labels = [0, 1, 2, 3, 4, 0, 3]
    loss(features_at(loss.targets[perm], labels), torch.tensor(labels))
    assert loss.assignment.tolist() == perm
    assert int(loss.step) == 1
    name, points = loss.reference_points()
    assert name == "targets" and points.dtype == torch.float32 and points.device.type == "cpu"
    torch.testing.assert_close(points, loss.targets[perm])


def test_tsc_assignment_maximises_total_cosine_against_brute_force() -> None:
    loss = TargetedContrastiveLoss(5, 3, seed=2)
    loss.centers.copy_(randn(5, 3, seed=7))
    loss.initialized.fill_(True)
    assigned = loss.assign().tolist()
    cosine = F.normalize(loss.centers, dim=1) @ loss.targets.T
    totals = {
        perm: sum(float(cosine[c, t]) for c, t in enumerate(perm))
        for perm in itertools.permutations(range(5))
    }
    best = max(totals, key=totals.get)
    assert assigned == list(best)
    # the identity is not the optimum here, so the test sees the assignment move
    assert assigned != [0, 1, 2, 3, 4]


def test_tsc_assignment_recomputed_only_every_assign_every_steps() -> None:
    loss = TargetedContrastiveLoss(4, 6, assign_every=3, momentum=0.0, seed=0)
    first, second = [1, 0, 3, 2], [3, 2, 1, 0]
    labels = torch.tensor([0, 1, 2, 3])
    seen = []
    for step in range(5):
        perm = first if step == 0 else second
        loss(features_at(loss.targets[perm], labels.tolist()), labels)
        seen.append(loss.assignment.tolist())
    # step 0 assigns; steps 1 and 2 keep it although the centres moved; step 3 reassigns
    assert seen == [first, first, first, second, second]
    assert int(loss.step) == 5


def test_tsc_centres_follow_an_ema_of_normalised_class_means() -> None:
    loss = TargetedContrastiveLoss(3, 2, momentum=0.9, seed=0)
    x1 = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 5.0]])
    loss(x1, torch.tensor([0, 0, 1]))
    # class 0: mean of unit (1, 0) and (0, 1), normalised; class 1: (0, 1); class 2 unseen
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(loss.centers, torch.tensor([[r, r], [0.0, 1.0], [0.0, 0.0]]))
    assert loss.initialized.tolist() == [True, True, False]
    loss(torch.tensor([[-2.0, 0.0], [4.0, 4.0]]), torch.tensor([0, 2]))
    expected = torch.tensor([[0.9 * r - 0.1, 0.9 * r], [0.0, 1.0], [r, r]])
    torch.testing.assert_close(loss.centers, expected)
    assert loss.initialized.tolist() == [True, True, True]


def test_tsc_state_dict_round_trip() -> None:
    loss = TargetedContrastiveLoss(4, 6, assign_every=2, seed=0)
    perm = [2, 3, 0, 1]
    labels = torch.tensor([0, 1, 2, 3, 3])
    for _ in range(3):
        loss(features_at(loss.targets[perm], labels.tolist()), labels)
    state = loss.state_dict()
    assert set(state) == {"targets", "assignment", "centers", "initialized", "step"}
    fresh = TargetedContrastiveLoss(4, 6, assign_every=2, seed=9)
    fresh.load_state_dict(state)
    assert fresh.assignment.tolist() == perm and int(fresh.step) == 3
    for key, value in state.items():
        assert torch.equal(fresh.state_dict()[key], value), key
    features = randn(5, 6, seed=1)
    torch.testing.assert_close(fresh.eval()(features, labels), loss.eval()(features, labels))


def test_tsc_dense_features_with_ignore_index_equal_the_flattened_rows() -> None:
    features = randn(2, 5, 3, 4, seed=3)
    labels = torch.randint(0, 3, (2, 6, 8), generator=torch.Generator().manual_seed(4))
    labels[0, :2] = IGNORE
    dense = TargetedContrastiveLoss(3, 5, seed=0)
    flat = TargetedContrastiveLoss(3, 5, seed=0)
    out_dense = dense(features, labels)
    # nearest-neighbour resize by a factor 2 keeps every second label
    small = labels[:, ::2, ::2].reshape(-1)
    rows = features.permute(0, 2, 3, 1).reshape(-1, 5)
    keep = small != IGNORE
    assert 0 < int(keep.sum()) < keep.numel()
    out_flat = flat(rows[keep], small[keep])
    torch.testing.assert_close(out_dense, out_flat)
    torch.testing.assert_close(dense.centers, flat.centers)
    assert float(out_dense["target_ce"]) == pytest.approx(
        tsc_by_loops(flat, rows, torch.where(keep, small, IGNORE)), rel=1e-5
    )


@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 2, 2)])
def test_tsc_all_ignored_batch_gives_a_connected_zero(shape: tuple[int, ...]) -> None:
    loss = TargetedContrastiveLoss(3, 3, seed=0)
    features = (300.0 + randn(*shape)).half().requires_grad_()
    labels = torch.full((shape[0], *shape[2:]), IGNORE)
    out = loss(features, labels)
    assert set(out) == {"loss", "target_ce"}
    assert out["loss"].dtype == torch.float32 and float(out["loss"].detach()) == 0.0
    out["loss"].backward()
    assert features.grad is not None and torch.equal(features.grad, torch.zeros_like(features))
    assert int(loss.step) == 1 and not bool(loss.initialized.any())


def test_tsc_gradient_reaches_the_features_only() -> None:
    loss = TargetedContrastiveLoss(3, 4, seed=0)
    features = randn(6, 4).requires_grad_()
    loss(features, torch.tensor([0, 1, 2, 0, 1, 2]))["loss"].backward()
    assert features.grad is not None and float(features.grad.abs().sum()) > 0
    for name, buffer in loss.named_buffers():
        assert not buffer.requires_grad and buffer.grad is None, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tsc_half_precision_inputs_compute_in_float32(dtype: torch.dtype) -> None:
    features = (300.0 * randn(64, 16)).to(dtype)
    labels = torch.arange(64) % 4
    low = TargetedContrastiveLoss(4, 16, seed=0)(features, labels)
    ref = TargetedContrastiveLoss(4, 16, seed=0)(features.float(), labels)
    for key in ("loss", "target_ce"):
        assert low[key].dtype == torch.float32
        assert torch.isfinite(low[key])
        torch.testing.assert_close(low[key], ref[key])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = TargetedContrastiveLoss(4, 16, seed=0)(features.float(), labels)
    assert auto["loss"].dtype == torch.float32
    torch.testing.assert_close(auto["loss"], ref["loss"])


def test_tsc_ddp_all_reduces_the_class_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another rank holds class 1 at (0, 2): the reduced centres see both ranks' rows."""
    reduced, broadcast = [], []

    def fake_all_reduce(tensor: torch.Tensor, op: object = None) -> None:
        reduced.append(tensor.clone())
        other = torch.zeros_like(tensor)
        other[1] = torch.tensor([0.0, 1.0, 1.0])  # unit (0, 1), count 1
        tensor.add_(other)

    monkeypatch.setattr(module, "is_distributed", lambda: True)
    monkeypatch.setattr(module.dist, "all_reduce", fake_all_reduce)
    monkeypatch.setattr(module.dist, "broadcast", lambda t, src: broadcast.append(src))
    loss = TargetedContrastiveLoss(3, 2, seed=0)
    loss(torch.tensor([[2.0, 0.0], [1.0, 0.0]]), torch.tensor([0, 1]))
    assert len(reduced) == 1 and broadcast == [0]
    torch.testing.assert_close(reduced[0], torch.tensor([[1.0, 0, 1], [1, 0, 1], [0, 0, 0]]))
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(loss.centers, torch.tensor([[1.0, 0.0], [r, r], [0.0, 0.0]]))
    assert loss.initialized.tolist() == [True, True, False]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_classes": 1}, ValueError, "num_classes"),
        ({"num_classes": 2.0}, TypeError, "num_classes"),
        ({"feat_dim": 0}, ValueError, "feat_dim"),
        ({"feat_dim": 1}, ValueError, "feat_dim must be >= 2"),
        ({"weight": -1.0}, ValueError, "weight"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"temperature": float("nan")}, ValueError, "temperature"),
        ({"assign_every": 0}, ValueError, "assign_every"),
        ({"assign_every": 1.5}, TypeError, "assign_every"),
        ({"momentum": 1.5}, ValueError, "momentum"),
        ({"ignore_index": 2.5}, TypeError, "ignore_index"),
        ({"seed": "0"}, TypeError, "seed"),
    ],
)
def test_tsc_bad_arguments_raise_naming_them(kwargs: dict, error: type, match: str) -> None:
    args = {"num_classes": 3, "feat_dim": 4, **kwargs}
    with pytest.raises(error, match=match):
        TargetedContrastiveLoss(args.pop("num_classes"), args.pop("feat_dim"), **args)


def test_tsc_bad_inputs_raise_naming_them() -> None:
    loss = TargetedContrastiveLoss(3, 4, seed=0)
    with pytest.raises(ValueError, match="feat_dim=4"):
        loss(randn(5, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must lie in"):
        loss(randn(2, 4), torch.tensor([0, 3]))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        loss(randn(2, 4), torch.tensor([0.0, 1.0]))


# --------------------------------------------------------------------------------------------
# CenterCollapseLoss
# --------------------------------------------------------------------------------------------


def test_ceco_etf_is_the_library_simplex_etf() -> None:
    loss = CenterCollapseLoss(4, 6, seed=5)
    torch.testing.assert_close(loss.etf, simplex_etf(6, 4, seed=5).T.float(), rtol=0, atol=0)
    assert loss.etf.dtype == torch.float32 and list(loss.parameters()) == []
    name, points = loss.reference_points()
    assert name == "etf" and points.dtype == torch.float32 and points.device.type == "cpu"
    assert torch.equal(points, loss.etf)


@pytest.mark.parametrize(("c", "d"), [(4, 3), (5, 4), (2, 1), (3, 3), (3, 7)])
def test_ceco_etf_has_unit_rows_and_equal_negative_cosines(c: int, d: int) -> None:
    etf = CenterCollapseLoss(c, d, seed=1).etf.double()
    assert etf.shape == (c, d)
    expected = torch.full((c, c), -1.0 / (c - 1), dtype=torch.float64)
    expected.fill_diagonal_(1.0)
    torch.testing.assert_close(etf @ etf.T, expected, atol=1e-6, rtol=0)


def test_ceco_refuses_feat_dim_below_num_classes_minus_one() -> None:
    with pytest.raises(ValueError, match=r"feat_dim must be >= num_classes - 1.*feat_dim=2"):
        CenterCollapseLoss(4, 2)


def test_ceco_loss_matches_a_hand_loop() -> None:
    loss = CenterCollapseLoss(4, 5, scale=3.0, weight=0.5, seed=2)
    features = randn(8, 5, seed=1)
    labels = torch.tensor([0, 2, 2, IGNORE, 0, 0, 3, IGNORE])  # class 1 absent
    out = loss(features, labels)
    expected = ceco_by_loops(loss, features, labels)
    assert set(out) == {"loss", "center_ce"}
    assert float(out["center_ce"]) == pytest.approx(expected, rel=1e-5)
    assert float(out["loss"]) == pytest.approx(0.5 * expected, rel=1e-5)
    # no state: eval mode computes the same
    torch.testing.assert_close(loss.eval()(features, labels), out)


def test_ceco_perfect_centres_give_the_etf_optimum() -> None:
    """Centres exactly on their ETF rows: CE = log(1 + (C - 1) exp(-s C / (C - 1)))."""
    c, s = 4, 2.0
    loss = CenterCollapseLoss(c, 6, scale=s, seed=0)
    labels = [0, 1, 2, 3, 3, 1]
    out = loss(features_at(loss.etf, labels, scale=2.0), torch.tensor(labels))
    expected = math.log(1 + (c - 1) * math.exp(-s * c / (c - 1)))
    assert float(out["center_ce"]) == pytest.approx(expected, rel=1e-4)


def test_ceco_dense_features_with_ignore_index_equal_the_flattened_rows() -> None:
    loss = CenterCollapseLoss(3, 4, seed=0)
    features = randn(2, 4, 3, 4, seed=5)
    labels = torch.randint(0, 3, (2, 6, 8), generator=torch.Generator().manual_seed(6))
    labels[1, 2:] = IGNORE
    out_dense = loss(features, labels)
    small = labels[:, ::2, ::2].reshape(-1)
    rows = features.permute(0, 2, 3, 1).reshape(-1, 4)
    keep = small != IGNORE
    assert 0 < int(keep.sum()) < keep.numel()
    torch.testing.assert_close(out_dense, loss(rows[keep], small[keep]))
    assert float(out_dense["center_ce"]) == pytest.approx(
        ceco_by_loops(loss, rows, small), rel=1e-5
    )


@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 2, 2)])
def test_ceco_all_ignored_batch_gives_a_connected_zero(shape: tuple[int, ...]) -> None:
    loss = CenterCollapseLoss(3, 3, seed=0)
    features = (300.0 + randn(*shape)).half().requires_grad_()
    out = loss(features, torch.full((shape[0], *shape[2:]), IGNORE))
    assert set(out) == {"loss", "center_ce"}
    assert out["center_ce"].dtype == torch.float32 and float(out["loss"].detach()) == 0.0
    out["loss"].backward()
    assert features.grad is not None and torch.equal(features.grad, torch.zeros_like(features))


def test_ceco_gradient_reaches_the_features_only() -> None:
    loss = CenterCollapseLoss(3, 4, seed=0)
    features = randn(6, 4).requires_grad_()
    loss(features, torch.tensor([0, 1, 2, 0, 1, IGNORE]))["loss"].backward()
    assert features.grad is not None and float(features.grad[:5].abs().sum()) > 0
    assert torch.equal(features.grad[5], torch.zeros(4))  # an ignored row gets nothing
    assert not loss.etf.requires_grad and loss.etf.grad is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ceco_half_precision_inputs_compute_in_float32(dtype: torch.dtype) -> None:
    """Class sums of 32 rows of about 1e4 pass float16's maximum: summed in float32."""
    loss = CenterCollapseLoss(2, 16, seed=0)
    features = (1e4 + 100.0 * randn(64, 16)).to(dtype)
    labels = torch.arange(64) % 2
    low = loss(features, labels)
    ref = loss(features.float(), labels)
    for key in ("loss", "center_ce"):
        assert low[key].dtype == torch.float32 and torch.isfinite(low[key])
        torch.testing.assert_close(low[key], ref[key])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = loss(features.float(), labels)
    assert auto["loss"].dtype == torch.float32
    torch.testing.assert_close(auto["loss"], ref["loss"])


def test_ceco_state_dict_round_trip() -> None:
    loss = CenterCollapseLoss(3, 5, seed=0)
    state = loss.state_dict()
    assert set(state) == {"etf"}
    other = CenterCollapseLoss(3, 5, seed=1)
    assert not torch.equal(other.etf, loss.etf)
    other.load_state_dict(state)
    assert torch.equal(other.etf, loss.etf)
    features, labels = randn(6, 5), torch.tensor([0, 1, 2, 2, 1, 0])
    torch.testing.assert_close(other(features, labels), loss(features, labels))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_classes": 1}, ValueError, "num_classes"),
        ({"feat_dim": 0}, ValueError, "feat_dim"),
        ({"feat_dim": True}, TypeError, "feat_dim"),
        ({"weight": -0.1}, ValueError, "weight"),
        ({"scale": 0.0}, ValueError, "scale"),
        ({"scale": float("inf")}, ValueError, "scale"),
        ({"ignore_index": "255"}, TypeError, "ignore_index"),
        ({"seed": 1.0}, TypeError, "seed"),
    ],
)
def test_ceco_bad_arguments_raise_naming_them(kwargs: dict, error: type, match: str) -> None:
    args = {"num_classes": 3, "feat_dim": 4, **kwargs}
    with pytest.raises(error, match=match):
        CenterCollapseLoss(args.pop("num_classes"), args.pop("feat_dim"), **args)
