"""SemanticAnchorRegularizer.pull_loss: the pull alone, for a second batch of a step (the
pseudo-labelled images of semi-supervised training), equal to forward's pull and free of
any state change."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from anchorlearn.losses.sar import SemanticAnchorRegularizer

C, D = 4, 16


class SwitchClassifier:
    """``P @ W.T + margins``: large diagonal margins let every anchor pass the gate, zero
    margins let none pass."""

    def __init__(self, margins: torch.Tensor) -> None:
        self.weight_matrix = 0.01 * torch.randn(C, D)
        self.margins = margins

    def __call__(self, projected: torch.Tensor) -> torch.Tensor:
        return projected @ self.weight_matrix.T + self.margins


def make_sar(margins: torch.Tensor, **kwargs) -> SemanticAnchorRegularizer:
    projector = nn.Sequential(nn.Linear(D, D), nn.BatchNorm1d(D))  # has running statistics
    return SemanticAnchorRegularizer(
        C,
        D,
        SwitchClassifier(margins),
        projector=projector,
        seed=0,
        ignore_index=None,
        update_conf=0.5,
        **kwargs,
    )


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_unchanged(before: dict[str, torch.Tensor], module: nn.Module) -> None:
    after = module.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


OPEN = 30.0 * torch.eye(C)
# classes 0 and 1 pass the per-class gate, 2 and 3 do not
HALF_OPEN = torch.diag(torch.tensor([30.0, 30.0, 0.0, 0.0]))


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"pull": "cosine"},
        {"pull": "l2_margin", "margin": 0.5},
        {"class_weights": torch.tensor([1.0, 2.0, 0.5, 1.0])},
        {"gate": "per_class"},
    ],
    ids=["l2", "cosine", "l2_margin", "class_weights", "per_class"],
)
def test_pull_loss_equals_the_pull_of_forward_and_changes_no_state(kwargs: dict) -> None:
    sar = make_sar(HALF_OPEN if kwargs.get("gate") == "per_class" else OPEN, **kwargs)
    features = torch.randn(12, D, requires_grad=True)
    labels = torch.arange(12) % C
    for _ in range(2):  # the first step opens the gate, the second moves the EMA
        out = sar(features, labels)
    before = snapshot(sar)
    pull = sar.pull_loss(features, labels)
    assert float(out["pull"].detach()) > 0
    assert torch.equal(pull, out["pull"])
    (grad,) = torch.autograd.grad(pull, features)
    (expected,) = torch.autograd.grad(out["pull"], features)
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)
    # no EMA step, no step counter, no projector BatchNorm statistics, no gate change
    assert_unchanged(before, sar)


def test_per_class_pull_loss_leaves_out_the_classes_not_ready() -> None:
    sar = make_sar(HALF_OPEN, gate="per_class")
    features = torch.randn(8, D)
    sar(features, torch.arange(8) % C)
    only_ready = sar.pull_loss(features[:2], torch.tensor([0, 1]))
    with_shut = sar.pull_loss(features[:4], torch.tensor([0, 1, 2, 3]))
    torch.testing.assert_close(with_shut, only_ready)


def test_pull_loss_is_a_connected_zero_while_the_gate_is_shut() -> None:
    sar = make_sar(torch.zeros(C, C))
    features = torch.randn(6, D, requires_grad=True)
    labels = torch.arange(6) % C
    assert sar(features, labels)["gate_open"] is False
    before = snapshot(sar)
    pull = sar.pull_loss(features, labels)
    assert float(pull.detach()) == 0.0
    (grad,) = torch.autograd.grad(pull, features)
    assert torch.equal(grad, torch.zeros_like(features))
    assert_unchanged(before, sar)


def test_pull_loss_follows_the_gate_of_the_latest_step() -> None:
    """gate="all": a step that fails the gate has no pull, even after the gate opened once
    (as forward): pull_loss of that step is zero too."""
    margins = OPEN.clone()
    sar = make_sar(margins)
    features, labels = torch.randn(6, D), torch.arange(6) % C
    assert sar(features, labels)["gate_open"] is True
    assert float(sar.pull_loss(features, labels)) > 0
    margins.zero_()  # the classifier no longer separates the anchors
    assert sar(features, labels)["gate_open"] is False
    assert float(sar.pull_loss(features, labels)) == 0.0


def test_pull_loss_of_an_empty_batch_is_a_zero_with_a_gradient() -> None:
    sar = make_sar(OPEN)
    sar(torch.randn(4, D), torch.arange(4))
    features = torch.randn(0, D, requires_grad=True)
    pull = sar.pull_loss(features, torch.zeros(0, dtype=torch.long))
    assert float(pull.detach()) == 0.0
    (grad,) = torch.autograd.grad(pull, features)
    assert grad.shape == (0, D)


def test_pull_loss_in_eval_mode_equals_forward_in_eval_mode() -> None:
    sar = make_sar(OPEN)
    features, labels = torch.randn(6, D), torch.arange(6) % C
    sar(features, labels)
    sar.eval()
    before = snapshot(sar)
    assert torch.equal(sar.pull_loss(features, labels), sar(features, labels)["pull"])
    assert_unchanged(before, sar)


def test_pull_loss_checks_its_inputs() -> None:
    sar = make_sar(OPEN)
    with pytest.raises(ValueError, match="feat_dim=16"):
        sar.pull_loss(torch.randn(3, D + 1), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        sar.pull_loss(torch.randn(3, D), torch.zeros(2, dtype=torch.long))


def test_forward_is_unchanged_by_a_pull_loss_call_in_between() -> None:
    """Two modules fed the same steps, one also computing pull_loss between them, end with
    the same state and the same outputs."""
    plain, probed = make_sar(OPEN), make_sar(OPEN)
    probed.load_state_dict(plain.state_dict())
    for step in range(3):
        features, labels = torch.randn(6, D), torch.arange(6) % C
        a = plain(features, labels)
        b = probed(features, labels)
        probed.pull_loss(torch.randn(5, D), torch.arange(5) % C)
        assert set(a) == set(b) == {"loss", "aux_ce", "pull", "gate_open", "gate_open_fraction"}
        for key in ("loss", "aux_ce", "pull", "gate_open_fraction"):
            assert torch.equal(a[key], b[key]), (step, key)
    assert_unchanged(snapshot(plain), probed)
