"""The training objective: a list of losses from :mod:`anchorlearn.losses`, built from config.

Each term reads either the model's logits (task losses) or its features (regularizers); the
objective sums their ``"loss"`` entries and reports every named term.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from anchorlearn.losses.etf import DotRegressionLoss
from anchorlearn.losses.fixed_targets import CenterCollapseLoss, TargetedContrastiveLoss
from anchorlearn.losses.long_tail import (
    BalancedSoftmaxLoss,
    CrossEntropyLoss,
    LDAMLoss,
    LogitAdjustedLoss,
)
from anchorlearn.losses.prototypes import CenterLoss, EMAPrototypeLoss
from anchorlearn.losses.sar import SemanticAnchorRegularizer, class_balanced_weights
from anchorlearn.models.etf import ETFClassifier

from .config import ConfigError, LossConfig
from .schema import did_you_mean

__all__ = ["LOSSES", "Objective", "build_objective", "check_losses", "loss_parameters"]


@dataclass(frozen=True)
class _LossSpec:
    cls: type[nn.Module]
    reads: str  # "logits" or "features"
    injected: tuple[str, ...]  # constructor arguments the engine supplies
    help: str
    # a task loss: it trains what the model predicts with (dot regression: the features onto
    # the fixed ETF classifier); an objective needs at least one
    trains_classifier: bool = False
    # a preset: parameters the entry sets unless the config sets them
    defaults: tuple[tuple[str, Any], ...] = ()


LOSSES: dict[str, _LossSpec] = {
    "ce": _LossSpec(CrossEntropyLoss, "logits", (), "cross-entropy", trains_classifier=True),
    "logit_adjusted": _LossSpec(
        LogitAdjustedLoss,
        "logits",
        ("class_counts",),
        "logit adjustment (Menon et al. 2021)",
        trains_classifier=True,
    ),
    "balanced_softmax": _LossSpec(
        BalancedSoftmaxLoss,
        "logits",
        ("class_counts",),
        "balanced softmax (Ren et al. 2020)",
        trains_classifier=True,
    ),
    "ldam": _LossSpec(
        LDAMLoss,
        "logits",
        ("class_counts",),
        "LDAM with deferred re-weighting (Cao et al. 2019)",
        trains_classifier=True,
    ),
    "dot_regression": _LossSpec(
        DotRegressionLoss,
        "features",
        ("etf_weight",),
        "dot regression to a fixed ETF (Yang et al. 2022)",
        trains_classifier=True,
    ),
    "sar": _LossSpec(
        SemanticAnchorRegularizer,
        "features",
        ("num_classes", "feat_dim", "classifier"),
        "Semantic Anchor Regularization",
    ),
    # opt-in: the release's SAR with the class-balanced pull (effective-number weights,
    # beta 0.9999) at pull weight 0.3, the variant chosen on the validation split; it beat
    # the release on every seed, in top-1 and by >= 2.7 few-shot points (BENCHMARKS.md 11)
    "sar_plus": _LossSpec(
        SemanticAnchorRegularizer,
        "features",
        ("num_classes", "feat_dim", "classifier"),
        "SAR with the class-balanced pull (class_weights: effective:0.9999, pull_weight: 0.3)",
        defaults=(("class_weights", "effective:0.9999"), ("pull_weight", 0.3)),
    ),
    "ema_prototype": _LossSpec(
        EMAPrototypeLoss, "features", ("num_classes", "feat_dim"), "EMA class prototypes"
    ),
    "center": _LossSpec(
        CenterLoss, "features", ("num_classes", "feat_dim"), "center loss (Wen et al. 2016)"
    ),
    "tsc_targets": _LossSpec(
        TargetedContrastiveLoss,
        "features",
        ("num_classes", "feat_dim"),
        "fixed uniform targets with an assignment step (TSC, Li et al. 2022)",
    ),
    "ceco": _LossSpec(
        CenterCollapseLoss,
        "features",
        ("num_classes", "feat_dim"),
        "batch class centres classified by a fixed ETF (CeCo, Zhong et al. 2023)",
    ),
}


# constructor arguments a config does not set: modules built in Python, and the void label,
# which is the data's
_NOT_CONFIGURABLE = frozenset({"projector", "ignore_index"})

# a config gives SAR's class_weights by name; the engine computes them from the training
# counts (anchorlearn.losses.class_balanced_weights)
_CLASS_WEIGHT_FORMS = "'inverse', 'effective' or 'effective:BETA' (BETA in [0, 1))"


def _class_weight_kind(value: Any, key: str) -> tuple[str, float]:
    """``(kind, beta)`` of a config's ``class_weights``: ``"inverse"``, ``"effective"``
    (beta 0.999) or ``"effective:BETA"``; anything else is a :class:`ConfigError`."""
    if isinstance(value, str):
        kind, sep, beta = value.partition(":")
        if kind == "inverse" and not sep:
            return kind, 0.999
        if kind == "effective":
            try:
                number = float(beta) if sep else 0.999
            except ValueError:
                number = -1.0
            if 0.0 <= number < 1.0:
                return kind, number
    raise ConfigError(f"{key} must be {_CLASS_WEIGHT_FORMS}, got {value!r}")


def loss_parameters(name: str) -> list[str]:
    """The parameters a config may set for the loss ``name`` (a key of :data:`LOSSES`): the
    keyword arguments of its class less those the engine supplies (the data's class count
    and void label, the model's feature size and classifier) and modules built in Python."""
    entry = LOSSES[name]
    params = inspect.signature(entry.cls.__init__).parameters
    return [
        param
        for param, p in params.items()
        if param != "self"
        and param not in entry.injected
        and param not in _NOT_CONFIGURABLE
        and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


def check_losses(specs: Sequence[LossConfig]) -> None:
    """Every loss is one of :data:`LOSSES` and every parameter one it takes
    (:func:`loss_parameters`), else a :class:`ConfigError` naming the entry
    (``losses.<i>``), the key, the closest allowed one and all the allowed ones."""
    for i, spec in enumerate(specs):
        if spec.name not in LOSSES:
            raise ConfigError(
                f"losses.{i}: unknown loss {spec.name!r}{did_you_mean(spec.name, LOSSES)}; "
                f"known losses: {', '.join(sorted(LOSSES))}"
            )
        allowed = loss_parameters(spec.name)
        for key in spec.params:
            if key not in allowed:
                raise ConfigError(
                    f"losses.{i}: unknown parameter {key!r} for loss {spec.name}"
                    f"{did_you_mean(key, allowed)}; allowed: {', '.join(allowed) or '(none)'}"
                )
        if "class_weights" in spec.params:
            _class_weight_kind(spec.params["class_weights"], f"losses.{i}.class_weights")


class Objective(nn.Module):
    """Sum of named loss terms; ``forward(logits, features, labels)`` returns a flat dict.

    The dict holds ``"loss"`` (the total) and ``"<name>/<term>"`` for every term of every
    loss, so the set of keys is the same at every step.
    """

    def __init__(self, names: Sequence[str], losses: Sequence[nn.Module], reads: Sequence[str]):
        super().__init__()
        self.names = list(names)
        self.reads = list(reads)
        self.terms = nn.ModuleList(losses)

    def set_epoch(self, epoch: int) -> None:
        """Tell the terms that follow an epoch schedule (LDAM's deferred re-weighting)
        which 0-based training epoch starts."""
        for loss in self.terms:
            set_epoch = getattr(loss, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(epoch)

    def forward(
        self,
        logits: torch.Tensor,
        features: torch.Tensor,
        labels: torch.Tensor,
        *,
        upsample: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        total = logits.new_zeros((), dtype=torch.float32)
        out: dict[str, torch.Tensor] = {}
        for name, read, loss in zip(self.names, self.reads, self.terms, strict=True):
            if read == "logits":
                inputs = upsample(logits, labels) if upsample is not None else logits
            else:
                inputs = features
            result = loss(inputs, labels)
            total = total + result["loss"].float()
            for key, value in result.items():
                if key == "loss":
                    continue
                if isinstance(value, bool):
                    value = torch.tensor(float(value))
                out[f"{name}/{key}"] = value.detach().float()
        out["loss"] = total
        return out


def build_objective(
    specs: Sequence[LossConfig],
    *,
    model: nn.Module,
    num_classes: int,
    class_counts: Sequence[int] | None,
    ignore_index: int | None = None,
) -> Objective:
    """Build the objective for ``model`` (which must expose ``classifier`` and ``feat_dim``).

    ``ignore_index`` (the data's void label, ``None`` when every label is a class) is given
    to every loss that takes one; it is not a loss parameter a config sets.
    """
    check_losses(specs)
    if not any(LOSSES[s.name].trains_classifier for s in specs):
        task_losses = [name for name, entry in LOSSES.items() if entry.trains_classifier]
        raise ConfigError(
            f"losses must include a task loss ({', '.join(task_losses[:-1])} or "
            f"{task_losses[-1]}); regularizers alone do not train the classifier"
        )
    names, losses, reads = [], [], []
    seen: dict[str, int] = {}
    for spec in specs:
        entry = LOSSES[spec.name]
        available: dict[str, Any] = {
            "num_classes": num_classes,
            "feat_dim": int(model.feat_dim),
            "classifier": model.classifier,
            "class_counts": class_counts,
        }
        if "etf_weight" in entry.injected:
            if not isinstance(model.classifier, ETFClassifier):
                raise ConfigError("loss dot_regression needs model.etf_classifier: true")
            available["etf_weight"] = model.classifier.weight
        if "class_counts" in entry.injected and class_counts is None:
            raise ConfigError(f"loss {spec.name} needs training class counts")
        kwargs = {k: available[k] for k in entry.injected}
        if _takes(entry.cls, "ignore_index"):
            kwargs["ignore_index"] = ignore_index
        params = {**dict(entry.defaults), **spec.params}
        if params.get("class_weights") is not None:
            kind, beta = _class_weight_kind(params["class_weights"], "class_weights")
            if class_counts is None:
                raise ConfigError(f"loss {spec.name}: class_weights needs training class counts")
            params["class_weights"] = class_balanced_weights(class_counts, kind, beta)
        try:
            loss = entry.cls(**kwargs, **params)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"loss {spec.name}: {err}") from err
        seen[spec.name] = seen.get(spec.name, 0) + 1
        name = spec.name if seen[spec.name] == 1 else f"{spec.name}{seen[spec.name]}"
        names.append(name)
        losses.append(loss)
        reads.append(entry.reads)
    return Objective(names, losses, reads)


def _takes(cls: type, name: str) -> bool:
    return name in inspect.signature(cls.__init__).parameters
