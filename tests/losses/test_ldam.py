"""LDAM with deferred re-weighting (Cao et al. 2019) against a loop over samples."""

from __future__ import annotations

import math

import pytest
import torch

from anchorlearn.engine.objective import Objective
from anchorlearn.losses import LDAMLoss
from anchorlearn.models import CifarResNet, CosineClassifier

COUNTS = [5000.0, 500.0, 50.0]
IGNORE = 255


def reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    max_margin: float,
    scale: float,
    weights: list[float] | None,
) -> float:
    """Weighted mean over labelled samples of -log softmax(s * (z - margin on y))_y."""
    margins = [n**-0.25 for n in COUNTS]
    margins = [m * max_margin / max(margins) for m in margins]
    total, norm = 0.0, 0.0
    for z, y in zip(logits.double().tolist(), labels.tolist(), strict=True):
        if y == IGNORE:
            continue
        shifted = [scale * (v - (margins[c] if c == y else 0.0)) for c, v in enumerate(z)]
        log_norm = math.log(sum(math.exp(v) for v in shifted))
        w = 1.0 if weights is None else weights[y]
        total += -w * (shifted[y] - log_norm)
        norm += w
    return total / norm


def effective_weights(beta: float) -> list[float]:
    raw = [(1 - beta) / (1 - beta**n) for n in COUNTS]
    return [w * len(COUNTS) / sum(raw) for w in raw]


def test_margins_fall_as_the_fourth_root_of_the_count_and_peak_at_the_rarest_class() -> None:
    loss = LDAMLoss(COUNTS, max_margin=0.5)
    assert loss.margins[2].item() == pytest.approx(0.5)
    assert loss.margins[0].item() == pytest.approx(0.5 * (50 / 5000) ** 0.25)
    assert loss.margins[1].item() == pytest.approx(0.5 * (50 / 500) ** 0.25)


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_the_loss_matches_the_reference_before_the_reweighting(scale: float) -> None:
    torch.manual_seed(0)
    logits = torch.randn(12, 3).tanh()  # cosines, as the recipe's classifier gives
    labels = torch.tensor([0, 1, 2, 2, IGNORE, 1, 0, 0, 2, 1, IGNORE, 0])
    loss = LDAMLoss(COUNTS, scale=scale, drw_start_epoch=3)
    loss.set_epoch(2)
    got = loss(logits, labels)
    expected = reference(logits, labels, max_margin=0.5, scale=scale, weights=None)
    assert not loss.reweighting
    assert got["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert set(got) == {"loss", "ce"}


def test_the_reweighting_starts_at_its_epoch_with_inverse_effective_numbers() -> None:
    torch.manual_seed(1)
    logits = torch.randn(16, 3).tanh()
    labels = torch.randint(0, 3, (16,))
    loss = LDAMLoss(COUNTS, drw_start_epoch=3, drw_beta=0.999)
    before = loss(logits, labels)["loss"].item()
    loss.set_epoch(3)
    after = loss(logits, labels)["loss"].item()
    assert loss.reweighting
    weights = effective_weights(0.999)
    assert after == pytest.approx(
        reference(logits, labels, max_margin=0.5, scale=30.0, weights=weights), rel=1e-5
    )
    assert before == pytest.approx(
        reference(logits, labels, max_margin=0.5, scale=30.0, weights=None), rel=1e-5
    )
    assert loss.drw_weights.sum().item() == pytest.approx(3.0, rel=1e-6)
    assert loss.drw_weights[2] > loss.drw_weights[1] > loss.drw_weights[0]


def test_without_a_start_epoch_the_loss_never_reweights() -> None:
    loss = LDAMLoss(COUNTS)
    loss.set_epoch(10_000)
    assert not loss.reweighting


def test_dense_logits_equal_their_flattened_positions() -> None:
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 4, 5).tanh()
    labels = torch.randint(0, 3, (2, 4, 5))
    labels[0, 0, :3] = IGNORE
    loss = LDAMLoss(COUNTS, drw_start_epoch=0)
    dense = loss(logits, labels)["loss"]
    flat = loss(logits.permute(0, 2, 3, 1).reshape(-1, 3), labels.reshape(-1))["loss"]
    assert dense.item() == pytest.approx(flat.item(), rel=1e-6)


def test_all_ignored_is_a_finite_zero_connected_to_the_logits() -> None:
    logits = torch.randn(3, 3, requires_grad=True)
    out = LDAMLoss(COUNTS)(logits, torch.full((3,), IGNORE))["loss"]
    out.backward()
    assert out.item() == 0.0 and logits.grad is not None


def test_the_margin_favours_the_rare_class_gradient() -> None:
    """With equal logits, the rare class's sample has the larger loss: its margin is larger."""
    logits = torch.zeros(1, 3)
    loss = LDAMLoss(COUNTS, drw_start_epoch=None)
    head = loss(logits, torch.tensor([0]))["loss"]
    tail = loss(logits, torch.tensor([2]))["loss"]
    assert tail > head


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_margin": 0.0}, "max_margin"),
        ({"scale": -1.0}, "scale"),
        ({"drw_start_epoch": -1}, "drw_start_epoch"),
        ({"drw_start_epoch": 1.5}, "drw_start_epoch"),
        ({"drw_beta": 1.0}, "drw_beta"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LDAMLoss(COUNTS, **kwargs)


def test_logits_with_the_wrong_number_of_classes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"3 classes in dim 1"):
        LDAMLoss(COUNTS)(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))


def test_the_objective_passes_the_epoch_on() -> None:
    loss = LDAMLoss(COUNTS, drw_start_epoch=2)
    objective = Objective(["ldam"], [loss], ["logits"])
    objective.set_epoch(2)
    assert loss.epoch == 2 and loss.reweighting


def test_the_cosine_classifier_gives_cosines() -> None:
    torch.manual_seed(3)
    head = CosineClassifier(8, 3)
    x = torch.randn(5, 8) * 10
    logits = head(x)
    expected = torch.nn.functional.cosine_similarity(x[:, None], head.weight[None], dim=-1)
    torch.testing.assert_close(logits, expected)
    model = CifarResNet(1, num_classes=3, cosine_classifier=True)
    out, features = model(torch.randn(2, 3, 32, 32))
    assert isinstance(model.classifier, CosineClassifier) and out.abs().max() <= 1.0 + 1e-6
    assert features.shape == (2, 64)
    with pytest.raises(TypeError, match="cosine_classifier must be a bool"):
        CifarResNet(1, cosine_classifier="yes")  # type: ignore[arg-type]


def test_sar_refuses_a_classifier_whose_logits_cannot_reach_its_gate() -> None:
    """Cosine logits in [-1, 1] give an anchor at most e^2 / (e^2 + 9) = 0.45 of its class's
    probability with 10 classes: below update_conf = 0.8, the gate could never open."""
    from anchorlearn.losses import SemanticAnchorRegularizer

    head = CosineClassifier(8, 10)
    with pytest.raises(ValueError, match=r"at most 0\.451 with 10 classes, never above"):
        SemanticAnchorRegularizer(10, 8, head)
    # with two classes the bound allows 0.88 > 0.8: accepted
    SemanticAnchorRegularizer(2, 8, CosineClassifier(8, 2))
