"""Classification metrics: top-1, per-class and balanced accuracy, group (many/medium/few)
accuracy.

Every function accepts either logits ``(N, C)`` or predicted labels ``(N,)`` as ``preds``
and integer ``targets`` ``(N,)``. Class groups (e.g. many/medium/few shot) are passed in as
a mapping from class index to group name; this module does not derive them from counts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from anchorlearn._checks import check_label_range, check_labels_tensor, check_num_classes

__all__ = [
    "balanced_accuracy",
    "classification_report",
    "group_accuracy",
    "group_means",
    "per_class_accuracy",
    "top1_accuracy",
]

ClassGroups = Mapping[int, str] | Sequence[str]


def _predicted_labels(
    preds: torch.Tensor, targets: torch.Tensor, num_classes: int | None
) -> torch.Tensor:
    """Validate ``preds`` (logits ``(N, C)`` or labels ``(N,)``) and ``targets`` ``(N,)``;
    return the predicted labels ``(N,)``."""
    if not isinstance(preds, torch.Tensor):
        raise TypeError(f"preds must be a torch.Tensor, got {type(preds).__name__}")
    targets = check_labels_tensor(targets, "targets")
    if targets.ndim != 1 or targets.numel() == 0:
        raise ValueError(f"targets must have shape (N,) with N > 0, got {tuple(targets.shape)}")
    if preds.ndim == 2 and preds.is_floating_point():
        if num_classes is not None and preds.shape[1] != num_classes:
            raise ValueError(
                f"preds (logits) must have num_classes={num_classes} columns, "
                f"got shape {tuple(preds.shape)}"
            )
        labels = preds.argmax(dim=1)
    elif preds.ndim == 1:
        labels = check_labels_tensor(preds, "preds")
    else:
        raise ValueError(
            "preds must be float logits (N, C) or integer labels (N,), "
            f"got shape {tuple(preds.shape)} dtype {preds.dtype}"
        )
    if labels.shape[0] != targets.shape[0]:
        raise ValueError(
            f"preds must have N={targets.shape[0]} rows to match targets, got {labels.shape[0]}"
        )
    if num_classes is not None:
        check_label_range(targets, num_classes, None, "targets")
    return labels


def top1_accuracy(preds: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of samples whose predicted class equals the target, in ``[0, 1]``."""
    labels = _predicted_labels(preds, targets, None)
    return float((labels == targets).double().mean())


def per_class_accuracy(
    preds: torch.Tensor, targets: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Recall of every class, ``(C,)`` float64; NaN for classes absent from ``targets``."""
    check_num_classes(num_classes)
    labels = _predicted_labels(preds, targets, num_classes)
    targets = targets.long()
    support = torch.bincount(targets, minlength=num_classes).double()
    correct = torch.bincount(targets[labels == targets], minlength=num_classes).double()
    return torch.where(support > 0, correct / support.clamp_min(1), torch.nan)


def balanced_accuracy(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> float:
    """Mean per-class recall over the classes present in ``targets``."""
    return float(per_class_accuracy(preds, targets, num_classes).nanmean())


def class_group_names(class_to_group: ClassGroups, num_classes: int) -> list[str]:
    """The group name of every class ``0..C-1`` as a list."""
    if isinstance(class_to_group, Mapping):
        missing = [c for c in range(num_classes) if c not in class_to_group]
        if missing:
            raise ValueError(
                f"class_to_group must map every class in [0, {num_classes}), "
                f"got no group for classes {missing[:10]}"
            )
        return [str(class_to_group[c]) for c in range(num_classes)]
    if isinstance(class_to_group, str) or not isinstance(class_to_group, Sequence):
        raise TypeError(
            "class_to_group must be a mapping class -> group or a sequence of group names, "
            f"got {type(class_to_group).__name__}"
        )
    if len(class_to_group) != num_classes:
        raise ValueError(
            f"class_to_group must have num_classes={num_classes} entries, got {len(class_to_group)}"
        )
    return [str(g) for g in class_to_group]


def group_means(per_class: torch.Tensor, class_to_group: ClassGroups) -> dict[str, float]:
    """Mean of ``per_class`` ``(C,)`` values within each group, ignoring NaN entries.

    A group whose classes are all NaN (or that has no class) gets NaN. Groups appear in the
    order of their first class.
    """
    if not isinstance(per_class, torch.Tensor) or per_class.ndim != 1:
        raise ValueError(f"per_class must be a 1-D tensor (C,), got {per_class!r}")
    groups = class_group_names(class_to_group, per_class.shape[0])
    result: dict[str, float] = {}
    for name in dict.fromkeys(groups):
        members = torch.tensor([g == name for g in groups])
        values = per_class[members]
        values = values[~values.isnan()]
        result[name] = float(values.double().mean()) if values.numel() else math.nan
    return result


def group_accuracy(
    preds: torch.Tensor, targets: torch.Tensor, class_to_group: ClassGroups
) -> dict[str, float]:
    """Accuracy of each class group, e.g. ``{"many": .., "medium": .., "few": ..}``.

    A group's accuracy is the mean per-class accuracy of its classes present in
    ``targets`` (as in Kang et al. 2020, "Decoupling representation and classifier"); on a
    class-balanced test set this equals the accuracy over the group's samples.
    ``num_classes`` is the length of ``class_to_group``.
    """
    num_classes = len(class_to_group)
    return group_means(per_class_accuracy(preds, targets, num_classes), class_to_group)


def classification_report(
    preds: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    class_to_group: ClassGroups | None = None,
) -> dict[str, float]:
    """``top1``, ``balanced_acc`` and, given groups, ``acc_<group>`` for every group."""
    per_class = per_class_accuracy(preds, targets, num_classes)
    report = {
        "top1": top1_accuracy(preds, targets),
        "balanced_acc": float(per_class.nanmean()),
    }
    if class_to_group is not None:
        for name, value in group_means(per_class, class_to_group).items():
            report[f"acc_{name}"] = value
    return report
