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

from anchorlearn.losses.etf import DotRegressionLoss, ETFClassifier
from anchorlearn.losses.long_tail import BalancedSoftmaxLoss, CrossEntropyLoss, LogitAdjustedLoss
from anchorlearn.losses.prototypes import CenterLoss, EMAPrototypeLoss
from anchorlearn.losses.sar import SemanticAnchorRegularizer

from .config import ConfigError, LossConfig

__all__ = ["LOSSES", "Objective", "build_objective"]


@dataclass(frozen=True)
class _LossSpec:
    cls: type[nn.Module]
    reads: str  # "logits" or "features"
    injected: tuple[str, ...]  # constructor arguments the engine supplies
    help: str


LOSSES: dict[str, _LossSpec] = {
    "ce": _LossSpec(CrossEntropyLoss, "logits", (), "cross-entropy"),
    "logit_adjusted": _LossSpec(
        LogitAdjustedLoss, "logits", ("class_counts",), "logit adjustment (Menon et al. 2021)"
    ),
    "balanced_softmax": _LossSpec(
        BalancedSoftmaxLoss, "logits", ("class_counts",), "balanced softmax (Ren et al. 2020)"
    ),
    "dot_regression": _LossSpec(
        DotRegressionLoss, "features", ("etf",), "dot regression to a fixed ETF (Yang et al. 2022)"
    ),
    "sar": _LossSpec(
        SemanticAnchorRegularizer,
        "features",
        ("num_classes", "feat_dim", "classifier"),
        "Semantic Anchor Regularization",
    ),
    "ema_prototype": _LossSpec(
        EMAPrototypeLoss, "features", ("num_classes", "feat_dim"), "EMA class prototypes"
    ),
    "center": _LossSpec(
        CenterLoss, "features", ("num_classes", "feat_dim"), "center loss (Wen et al. 2016)"
    ),
}


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
    names, losses, reads = [], [], []
    seen: dict[str, int] = {}
    for spec in specs:
        if spec.name not in LOSSES:
            raise ConfigError(
                f"unknown loss {spec.name!r}; known losses: {', '.join(sorted(LOSSES))}"
            )
    if not any(LOSSES[s.name].reads == "logits" or s.name == "dot_regression" for s in specs):
        raise ConfigError(
            "losses must include a task loss (ce, logit_adjusted, balanced_softmax or "
            "dot_regression); regularizers alone do not train the classifier"
        )
    for spec in specs:
        entry = LOSSES[spec.name]
        available: dict[str, Any] = {
            "num_classes": num_classes,
            "feat_dim": int(model.feat_dim),
            "classifier": model.classifier,
            "class_counts": class_counts,
        }
        if "etf" in entry.injected:
            if not isinstance(model.classifier, ETFClassifier):
                raise ConfigError("loss dot_regression needs model.etf_classifier: true")
            available["etf"] = model.classifier
        if "class_counts" in entry.injected and class_counts is None:
            raise ConfigError(f"loss {spec.name} needs training class counts")
        allowed = _user_parameters(entry.cls, entry.injected)
        unknown = sorted(set(spec.params) - set(allowed))
        if unknown:
            raise ConfigError(
                f"unknown parameter {unknown[0]!r} for loss {spec.name}; allowed: "
                f"{', '.join(allowed) or '(none)'}"
            )
        kwargs = {k: available[k] for k in entry.injected}
        if _takes(entry.cls, "ignore_index"):
            kwargs["ignore_index"] = ignore_index
        try:
            loss = entry.cls(**kwargs, **spec.params)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"loss {spec.name}: {err}") from err
        seen[spec.name] = seen.get(spec.name, 0) + 1
        name = spec.name if seen[spec.name] == 1 else f"{spec.name}{seen[spec.name]}"
        names.append(name)
        losses.append(loss)
        reads.append(entry.reads)
    return Objective(names, losses, reads)


# constructor arguments a config does not set: modules built in Python, and the void label,
# which is the data's
_NOT_CONFIGURABLE = frozenset({"projector", "ignore_index"})


def _takes(cls: type, name: str) -> bool:
    return name in inspect.signature(cls.__init__).parameters


def _user_parameters(cls: type, injected: tuple[str, ...]) -> list[str]:
    params = inspect.signature(cls.__init__).parameters
    return [
        name
        for name, p in params.items()
        if name != "self"
        and name not in injected
        and name not in _NOT_CONFIGURABLE
        and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
