"""Semantic segmentation metrics accumulated over batches: per-class IoU and accuracy,
mIoU, mAcc and aAcc, as reported by mmsegmentation.

Every batch adds to a ``(C, C)`` confusion matrix (rows: target class, columns: predicted
class) of the pixels whose target is not ``ignore_index``; predictions on ignored pixels do
not count. From the matrix, with ``TP_c`` its diagonal, ``T_c`` its row sums and ``P_c``
its column sums:

- ``iou[c] = TP_c / (T_c + P_c - TP_c)``, NaN for a class absent from both the targets and
  the predictions;
- ``acc[c] = TP_c / T_c`` (the class's recall), NaN for a class absent from the targets;
- ``miou`` and ``macc``: the means over the non-NaN classes (the undefined ones are left
  out, as in mmsegmentation), and ``miou_<group>`` / ``macc_<group>`` within class groups;
- ``aacc = sum_c TP_c / sum_c T_c``: the accuracy over all labelled pixels.

The counts are int64 and exact; the ratios are float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from anchorlearn._checks import check_label_range, check_labels_tensor, check_num_classes
from anchorlearn.metrics.classification import ClassGroups, class_group_names, group_means

__all__ = ["SegmentationIoU", "format_iou_table", "mean_iou"]


class SegmentationIoU(nn.Module):
    """Accumulating confusion matrix with per-class IoU / accuracy, mIoU, mAcc, aAcc and
    optional group (e.g. head/tail) means.

    Args:
        num_classes: number of classes ``C``.
        ignore_index: target value excluded from the metric (255 by default).
        class_to_group: optional mapping class -> group name (or a sequence of ``C`` names);
            ``compute()`` then adds ``miou_<group>`` and ``macc_<group>`` for each group.

    ``update(preds, targets)`` takes logits ``(B, C, H, W)`` or labels ``(B, H, W)`` and
    targets ``(B, H, W)`` of the same spatial size (upsample logits first).

    The buffer ``confusion`` ``(C, C)`` (int64, not saved in ``state_dict``) moves with
    ``.to()``; it holds this process's pixels only: under DDP, sum it over the processes
    (``torch.distributed.all_reduce(metric.confusion)``) before ``compute()``.
    """

    confusion: torch.Tensor

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
        self.register_buffer(
            "confusion", torch.zeros(num_classes, num_classes, dtype=torch.long), persistent=False
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
        num_cells = self.num_classes**2
        cells = targets.long() * self.num_classes + labels.to(targets.device).long()
        if self.ignore_index is not None:  # one extra bin, dropped, for the ignored pixels
            cells = torch.where(targets == self.ignore_index, num_cells, cells)
        counts = torch.bincount(cells.reshape(-1), minlength=num_cells + 1)[:num_cells]
        self.confusion += counts.reshape(self.confusion.shape).to(self.confusion.device)

    def compute(self) -> dict[str, float | torch.Tensor]:
        """``{"iou": (C,), "acc": (C,)}`` float64 tensors with NaN for undefined classes,
        ``"miou"``, ``"macc"``, ``"aacc"`` floats and ``"miou_<group>"``,
        ``"macc_<group>"`` floats for each group (see the module docstring)."""
        confusion = self.confusion.double().cpu()
        tp = confusion.diagonal()
        target_count = confusion.sum(dim=1)
        union = target_count + confusion.sum(dim=0) - tp
        iou = torch.where(union > 0, tp / union, math.nan)
        acc = torch.where(target_count > 0, tp / target_count, math.nan)
        labelled = float(target_count.sum())
        result: dict[str, float | torch.Tensor] = {
            "iou": iou,
            "miou": float(iou.nanmean()),
            "acc": acc,
            "macc": float(acc.nanmean()),
            "aacc": float(tp.sum()) / labelled if labelled else math.nan,
        }
        if self.class_to_group is not None:
            for key, values in (("miou", iou), ("macc", acc)):
                for name, value in group_means(values, self.class_to_group).items():
                    result[f"{key}_{name}"] = value
        return result

    def reset(self) -> None:
        """Forget every accumulated batch."""
        self.confusion.zero_()


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


def format_iou_table(class_names: Sequence[str], result: dict[str, float | torch.Tensor]) -> str:
    """A printable table of ``result`` (from :meth:`SegmentationIoU.compute`): one row per
    class with its IoU and accuracy in percent (``nan`` for an undefined value), then the
    summary lines ``aAcc``, ``mIoU`` and ``mAcc``.

    ``class_names`` has one name per class, in class order.
    """
    if isinstance(class_names, str) or not isinstance(class_names, Sequence):
        raise TypeError(
            f"class_names must be a sequence of names, got {type(class_names).__name__}"
        )
    missing = [k for k in ("iou", "acc", "miou", "macc", "aacc") if k not in result]
    if missing:
        raise ValueError(
            f"result must come from SegmentationIoU.compute() with keys iou, acc, miou, "
            f"macc, aacc, got no {', '.join(missing)}"
        )
    iou, acc = (torch.as_tensor(result[k], dtype=torch.float64).reshape(-1) for k in ("iou", "acc"))
    if not len(class_names) == iou.numel() == acc.numel():
        raise ValueError(
            f"class_names must have one name per class ({iou.numel()} in result), "
            f"got {len(class_names)}"
        )
    names = [str(name) for name in class_names]
    width = max([len("Class"), len("aAcc"), *(len(n) for n in names)])
    rows = [f"{'Class':<{width}}  {'IoU':>6}  {'Acc':>6}", "-" * (width + 16)]
    rows += [
        f"{name:<{width}}  {_percent(i):>6}  {_percent(a):>6}"
        for name, i, a in zip(names, iou.tolist(), acc.tolist(), strict=True)
    ]
    rows.append("-" * (width + 16))
    rows += [
        f"{label:<{width}}  {_percent(float(result[key])):>6}"
        for label, key in (("aAcc", "aacc"), ("mIoU", "miou"), ("mAcc", "macc"))
    ]
    return "\n".join(rows)


def _percent(value: float) -> str:
    return "nan" if math.isnan(value) else f"{100 * value:.2f}"
