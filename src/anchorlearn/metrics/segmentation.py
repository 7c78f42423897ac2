"""Semantic segmentation metrics: per-class IoU and mIoU accumulated over batches.

IoU is computed by torchmetrics' ``MulticlassJaccardIndex`` (``average=None``) with
``ignore_index`` pixels excluded. A class absent from both the predictions and the targets
of every accumulated batch has an undefined IoU: it is reported as NaN and excluded from
the mean (and from group means), as mmsegmentation does.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchmetrics.classification import MulticlassJaccardIndex

from anchorlearn.losses._checks import check_label_range, check_labels_tensor, check_num_classes
from anchorlearn.metrics.classification import ClassGroups, class_group_names, group_means

__all__ = ["SegmentationIoU", "mean_iou"]


class SegmentationIoU(nn.Module):
    """Accumulating per-class IoU / mIoU with optional group (e.g. head/tail) means.

    Args:
        num_classes: number of classes ``C``.
        ignore_index: target value excluded from the metric (255 by default).
        class_to_group: optional mapping class -> group name (or a sequence of ``C`` names);
            ``compute()`` then adds ``miou_<group>`` for each group.

    ``update(preds, targets)`` takes logits ``(B, C, H, W)`` or labels ``(B, H, W)`` and
    targets ``(B, H, W)`` of the same spatial size (upsample logits first).
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int | None = 255,
        class_to_group: ClassGroups | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        if ignore_index is not None and 0 <= ignore_index < num_classes:
            raise ValueError(
                f"ignore_index must lie outside [0, {num_classes}), got {ignore_index}"
            )
        self.ignore_index = ignore_index
        self.class_to_group = (
            None if class_to_group is None else class_group_names(class_to_group, num_classes)
        )
        self.jaccard = MulticlassJaccardIndex(
            num_classes, average=None, ignore_index=ignore_index, zero_division=math.nan
        )

    def update(self, preds: torch.Tensor, targets: torch.Tensor) -> None:
        """Accumulate one batch: ``preds`` ``(B, C, H, W)`` logits or ``(B, H, W)`` labels,
        ``targets`` ``(B, H, W)``."""
        if not isinstance(preds, torch.Tensor):
            raise TypeError(f"preds must be a torch.Tensor, got {type(preds).__name__}")
        targets = check_labels_tensor(targets, "targets")
        if targets.ndim != 3:
            raise ValueError(f"targets must have shape (B, H, W), got {tuple(targets.shape)}")
        if preds.ndim == 4 and preds.is_floating_point():
            if preds.shape[1] != self.num_classes:
                raise ValueError(
                    f"preds (logits) must have num_classes={self.num_classes} channels, "
                    f"got shape {tuple(preds.shape)}"
                )
            labels = preds.argmax(dim=1)
        elif preds.ndim == 3:
            labels = check_labels_tensor(preds, "preds")
            check_label_range(labels, self.num_classes, None, "preds")
        else:
            raise ValueError(
                "preds must be float logits (B, C, H, W) or integer labels (B, H, W), "
                f"got shape {tuple(preds.shape)} dtype {preds.dtype}"
            )
        if labels.shape != targets.shape:
            raise ValueError(
                f"preds must have the spatial size of targets {tuple(targets.shape)}, "
                f"got {tuple(labels.shape)}"
            )
        check_label_range(targets, self.num_classes, self.ignore_index, "targets")
        self.jaccard.update(labels.long(), targets.long())

    def compute(self) -> dict[str, float | torch.Tensor]:
        """``{"iou": (C,) tensor with NaN for absent classes, "miou": float,
        "miou_<group>": float for each group}``."""
        iou = self.jaccard.compute().double().cpu()
        result: dict[str, float | torch.Tensor] = {"iou": iou, "miou": float(iou.nanmean())}
        if self.class_to_group is not None:
            for name, value in group_means(iou, self.class_to_group).items():
                result[f"miou_{name}"] = value
        return result

    def reset(self) -> None:
        """Forget every accumulated batch."""
        self.jaccard.reset()


def mean_iou(
    preds: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    ignore_index: int | None = 255,
    class_to_group: ClassGroups | None = None,
) -> dict[str, float | torch.Tensor]:
    """One-shot :class:`SegmentationIoU` over ``preds`` and ``targets`` (see there)."""
    targets = check_labels_tensor(targets, "targets")
    metric = SegmentationIoU(num_classes, ignore_index, class_to_group).to(targets.device)
    metric.update(preds, targets)
    return metric.compute()
