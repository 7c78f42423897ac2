"""The loss table: what a config may set, which losses train the classifier, one check of
names and parameters for config loading and for the builder, and the reference points."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anchorlearn.engine.config import ConfigError, LossConfig, parse_config
from anchorlearn.engine.evaluate import reference_points
from anchorlearn.engine.objective import LOSSES, build_objective, check_losses, loss_parameters
from anchorlearn.losses import CenterLoss, SemanticAnchorRegularizer
from anchorlearn.models import FixedETFModel, create_model

C, D = 4, 16


class _Linear(nn.Module):
    """``(logits, features)`` from ``(N, D)`` inputs: the features are the inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.feat_dim = D
        self.classifier = nn.Linear(D, C)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.classifier(x), x


def build(specs: list[LossConfig], model: nn.Module | None = None, counts: list[int] | None = None):
    return build_objective(
        specs, model=model or _Linear(), num_classes=C, class_counts=counts or [5, 4, 3, 2]
    )


def test_loss_parameters_are_the_constructor_keywords_less_what_the_engine_supplies() -> None:
    assert loss_parameters("ce") == ["label_smoothing"]
    assert loss_parameters("logit_adjusted") == ["tau"]
    assert loss_parameters("balanced_softmax") == []
    assert loss_parameters("ldam") == ["max_margin", "scale", "drw_start_epoch", "drw_beta"]
    assert loss_parameters("dot_regression") == []  # the weight is the model's ETF
    assert loss_parameters("sar") == [
        "pull_weight",
        "aux_weight",
        "filter_conf",
        "update_conf",
        "ema_momentum",
        "gate_warn_steps",
        "seed",
        "anchor_init",
        "pull",
        "class_weights",
        "gate",
        "margin",
    ]
    assert loss_parameters("ema_prototype") == ["weight", "momentum"]
    assert loss_parameters("center") == ["weight"]
    assert loss_parameters("tsc_targets") == [
        "weight",
        "temperature",
        "assign_every",
        "momentum",
        "seed",
    ]
    assert loss_parameters("ceco") == ["weight", "scale", "seed"]


def test_the_task_losses_are_those_flagged_as_training_the_classifier() -> None:
    flagged = {name for name, entry in LOSSES.items() if entry.trains_classifier}
    assert flagged == {"ce", "logit_adjusted", "balanced_softmax", "ldam", "dot_regression"}
    assert all(LOSSES[name].reads == "features" for name in set(LOSSES) - flagged)
    with pytest.raises(ConfigError) as info:
        build([LossConfig("sar"), LossConfig("center")])
    assert str(info.value) == (
        "losses must include a task loss (ce, logit_adjusted, balanced_softmax, ldam or "
        "dot_regression); regularizers alone do not train the classifier"
    )


def test_dot_regression_alone_trains_an_etf_model_onto_its_classifier_weight() -> None:
    torch.manual_seed(0)
    model = FixedETFModel(create_model("small_cnn", num_classes=C, width=4, feat_dim=D), C)
    objective = build([LossConfig("dot_regression")], model)
    assert objective.names == ["dot_regression"] and objective.reads == ["features"]
    loss = objective.terms[0]
    torch.testing.assert_close(loss.weight, F.normalize(model.classifier.weight, dim=1))
    assert loss.ignore_index is None
    with pytest.raises(ConfigError, match=r"needs model\.etf_classifier: true"):
        build([LossConfig("dot_regression")])


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        (
            [LossConfig("ce"), LossConfig("sar", {"pull_wieght": 0.1})],
            "losses.1: unknown parameter 'pull_wieght' for loss sar (did you mean "
            "'pull_weight'?); allowed: pull_weight, aux_weight, filter_conf, update_conf, "
            "ema_momentum, gate_warn_steps, seed, anchor_init, pull, class_weights, gate, margin",
        ),
        (
            [LossConfig("sarr")],
            "losses.0: unknown loss 'sarr' (did you mean 'sar'?); known losses: "
            + ", ".join(sorted(LOSSES)),
        ),
        (
            [LossConfig("ce"), LossConfig("dot_regression", {"etf_weight": 1.0})],
            "losses.1: unknown parameter 'etf_weight' for loss dot_regression; allowed: (none)",
        ),
    ],
)
def test_config_loading_and_the_builder_refuse_names_and_parameters_alike(
    specs: list[LossConfig], message: str
) -> None:
    # a library user's raw specs get the message a config file gets when it is read
    for check in (
        lambda: check_losses(specs),
        lambda: build(specs),
        lambda: parse_config({"losses": [{"name": s.name, **s.params} for s in specs]}),
    ):
        with pytest.raises(ConfigError) as info:
            check()
        assert str(info.value) == message


def test_the_builder_passes_config_parameters_and_injects_the_rest() -> None:
    objective = build(
        [LossConfig("logit_adjusted", {"tau": 0.5}), LossConfig("center", {"weight": 0.2})]
    )
    adjusted, center = objective.terms
    assert adjusted.tau == 0.5 and center.weight == 0.2
    assert (center.num_classes, center.feat_dim) == (C, D)
    assert objective.names == ["logit_adjusted", "center"]


# ---------------------------------------------------------------- reference points


def test_reference_points_are_those_of_the_first_term_that_has_some() -> None:
    torch.manual_seed(0)
    model = _Linear()
    objective = build([LossConfig("ce"), LossConfig("sar"), LossConfig("center")], model)
    module = SimpleNamespace(objective=objective)
    _, sar, center = objective.terms
    assert isinstance(sar, SemanticAnchorRegularizer) and isinstance(center, CenterLoss)
    # the gate is shut: SAR has no semantic anchors yet, the centres come next
    assert sar.reference_points() is None
    name, points = reference_points(module)
    assert name == "centres"
    assert torch.equal(points, center.centers.detach())
    assert not points.requires_grad and points.dtype == torch.float32
    sar.gate_open_step.fill_(0)
    sar.semantic_anchors.copy_(torch.randn(C, D))
    name, points = reference_points(module)
    assert name == "semantic anchors" and torch.equal(points, sar.semantic_anchors)
    assert reference_points(SimpleNamespace(objective=build([LossConfig("ce")]))) is None


def test_sar_plus_is_sar_with_the_chosen_pull_unless_the_config_says_otherwise() -> None:
    from anchorlearn.losses import class_balanced_weights

    counts = [5000, 400, 30, 2]  # beta 0.9999 and 0.999 differ only for large counts
    torch.manual_seed(0)
    plus = build([LossConfig("ce"), LossConfig("sar_plus")], counts=counts).terms[1]
    assert isinstance(plus, SemanticAnchorRegularizer)
    expected = class_balanced_weights(counts, "effective", 0.9999)
    torch.testing.assert_close(plus.class_weights, expected)
    assert not torch.allclose(expected, class_balanced_weights(counts, "effective", 0.999))
    assert plus.pull_weight == 0.3
    # the rest is the release's SAR: same defaults as "sar"
    release = build([LossConfig("ce"), LossConfig("sar")], counts=counts).terms[1]
    assert release.class_weights is None and release.pull_weight == 0.1
    for name in ("aux_weight", "update_conf", "filter_conf", "pull", "gate"):
        assert getattr(plus, name) == getattr(release, name)
    # a config's own settings win over the preset's
    own = {"class_weights": "inverse", "pull_weight": 0.1}
    inverse = build([LossConfig("ce"), LossConfig("sar_plus", own)], counts=counts).terms[1]
    torch.testing.assert_close(inverse.class_weights, class_balanced_weights(counts, "inverse"))
    assert inverse.pull_weight == 0.1
    assert loss_parameters("sar_plus") == loss_parameters("sar")
