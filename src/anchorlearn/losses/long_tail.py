"""Cross-entropy task losses for long-tailed data, all taking LOGITS (not features).

* :class:`CrossEntropyLoss`: plain (optionally label-smoothed) cross-entropy.
* :class:`LogitAdjustedLoss`: logit-adjusted loss (Menon et al., "Long-tail learning via
  logit adjustment", ICLR 2021).
* :class:`BalancedSoftmaxLoss`: balanced softmax (Ren et al., "Balanced Meta-Softmax for
  Long-Tailed Visual Recognition", NeurIPS 2020).
* :class:`LDAMLoss`: label-distribution-aware margins with optional deferred re-weighting
  (Cao et al., "Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss",
  NeurIPS 2019).

Each accepts logits ``(N, C)`` with labels ``(N,)``, or dense logits ``(B, C, H, W)`` with
labels ``(B, H, W)`` of the same spatial size (no resizing: logits are usually upsampled to
the label size by the model). Positions labelled ``ignore_index`` contribute nothing; the
cross-entropy is averaged over the valid positions, and an all-ignored batch gives a finite
zero connected to the logits.

The class-prior adjustment is applied only inside the loss, at training time: at inference
the model's raw logits are used unchanged (for the logit-adjusted loss, this is the
"loss modification" variant of Menon et al., which needs no post-hoc correction).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from anchorlearn._checks import (
    check_finite,
    check_float_tensor,
    check_ignore_index,
    check_label_range,
    check_labels_tensor,
    check_non_negative,
    check_positive,
    check_probability,
    loss_compute_dtype,
    valid_label_mask,
)
from anchorlearn.losses.sar import class_balanced_weights

__all__ = ["BalancedSoftmaxLoss", "CrossEntropyLoss", "LDAMLoss", "LogitAdjustedLoss"]


def _check_class_counts(class_counts: object) -> torch.Tensor:
    """``class_counts``: a 1-D sequence or tensor of >= 2 finite counts, all > 0 (float64)."""
    if isinstance(class_counts, torch.Tensor):
        if class_counts.dtype == torch.bool or class_counts.is_complex():
            raise TypeError(f"class_counts must hold real numbers, got dtype {class_counts.dtype}")
        counts = class_counts.detach().to(device="cpu", dtype=torch.float64)
    elif isinstance(class_counts, Sequence) and not isinstance(class_counts, str):
        if not all(isinstance(c, int | float) and not isinstance(c, bool) for c in class_counts):
            raise TypeError("class_counts must be a sequence of numbers")
        counts = torch.tensor(list(class_counts), dtype=torch.float64)
    else:
        raise TypeError(
            f"class_counts must be a 1-D tensor or sequence of numbers, "
            f"got {type(class_counts).__name__}"
        )
    if counts.ndim != 1 or counts.numel() < 2:
        raise ValueError(
            f"class_counts must be 1-D with >= 2 entries (one per class), "
            f"got shape {tuple(counts.shape)}"
        )
    check_finite(counts, "class_counts")
    not_positive = (counts <= 0).nonzero().flatten()
    if not_positive.numel() > 0:
        index = int(not_positive[0])
        raise ValueError(
            f"class_counts must be > 0 for every class, got class_counts[{index}]="
            f"{counts[index].item():g} (class index {index}); "
            "drop empty classes or give them a count of at least 1"
        )
    return counts


class _AdjustedCrossEntropy(nn.Module):
    """Cross-entropy on ``logits + adjustment`` averaged over the valid positions."""

    adjustment: torch.Tensor | None

    def __init__(
        self,
        adjustment: torch.Tensor | None,
        *,
        ignore_index: int | None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.ignore_index = check_ignore_index(ignore_index)
        self.label_smoothing = check_probability(label_smoothing, "label_smoothing")
        self.register_buffer("adjustment", adjustment)

    def _validate(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        check_float_tensor(logits, "logits")
        labels = check_labels_tensor(labels)
        if logits.ndim not in (2, 4):
            raise ValueError(
                "logits must be 2-D (N, C) or 4-D (B, C, H, W), "
                f"got {logits.ndim}-D shape {tuple(logits.shape)}"
            )
        num_classes = logits.shape[1]
        if self.adjustment is not None and num_classes != self.adjustment.numel():
            raise ValueError(
                f"logits must have {self.adjustment.numel()} classes in dim 1 "
                f"(len(class_counts)), got shape {tuple(logits.shape)}"
            )
        expected = (logits.shape[0], *logits.shape[2:])
        if tuple(labels.shape) != expected:
            raise ValueError(
                f"labels must have shape {expected} to match logits {tuple(logits.shape)}, "
                f"got {tuple(labels.shape)}"
            )
        labels = labels.to(logits.device)
        check_finite(logits, "logits")
        check_label_range(labels, num_classes, self.ignore_index)
        return labels.long()

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return the (adjusted) cross-entropy.

        Args:
            logits: ``(N, C)`` or ``(B, C, H, W)``, floating point.
            labels: ``(N,)`` or ``(B, H, W)``, integer class indices or ``ignore_index``.

        Returns:
            ``{"loss": ce, "ce": ce}``, scalars.
        """
        labels = self._validate(logits, labels)
        dtype = loss_compute_dtype(logits.dtype)
        logits = logits.to(dtype)
        if self.adjustment is not None:
            shape = (1, -1) + (1,) * (logits.ndim - 2)
            logits = logits + self.adjustment.to(dtype).view(shape)
        ignore = -100 if self.ignore_index is None else self.ignore_index
        total = F.cross_entropy(
            logits,
            labels,
            ignore_index=ignore,
            reduction="sum",
            label_smoothing=self.label_smoothing,
        )
        num_valid = valid_label_mask(labels, self.ignore_index).sum().clamp_min(1)
        ce = total / num_valid.to(dtype)
        return {"loss": ce, "ce": ce}


class CrossEntropyLoss(_AdjustedCrossEntropy):
    r"""Cross-entropy with the loss-dict contract, so task losses are interchangeable.

    .. math::
        \mathcal{L}_\text{CE} = -\frac{1}{|V|} \sum_{i \in V} \log
        \operatorname{softmax}(z_i)_{y_i}

    (with label smoothing :math:`\epsilon`, the target is
    :math:`(1 - \epsilon)\, \text{onehot}(y) + \epsilon / C`).

    Args:
        ignore_index: label ignored in ``labels`` (``None``: every label is a class).
        label_smoothing: :math:`\epsilon \in [0, 1]`.
    """

    def __init__(self, *, ignore_index: int | None = 255, label_smoothing: float = 0.0) -> None:
        super().__init__(None, ignore_index=ignore_index, label_smoothing=label_smoothing)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}"


class LogitAdjustedLoss(_AdjustedCrossEntropy):
    r"""Logit-adjusted cross-entropy (Menon et al., ICLR 2021).

    With class prior :math:`\pi_c = n_c / \sum_k n_k` from the training-set counts,

    .. math::
        \mathcal{L}_\text{LA} = -\frac{1}{|V|} \sum_{i \in V} \log
        \frac{e^{z_{i,y_i} + \tau \log \pi_{y_i}}}{\sum_c e^{z_{i,c} + \tau \log \pi_c}} .

    Buffer ``adjustment`` ``(C,)`` holds :math:`\tau \log \pi`. Used only in the loss: predict
    with the raw logits :math:`\arg\max_c z_c`.

    Args:
        class_counts: training-set count per class, ``(C,)``, all > 0.
        tau: temperature :math:`\tau \ge 0` of the adjustment (0: plain cross-entropy).
        ignore_index: label ignored in ``labels`` (``None``: every label is a class).
    """

    def __init__(
        self,
        class_counts: torch.Tensor | Sequence[float],
        *,
        tau: float = 1.0,
        ignore_index: int | None = 255,
    ) -> None:
        counts = _check_class_counts(class_counts)
        tau = check_non_negative(tau, "tau")
        log_prior = torch.log(counts / counts.sum())
        super().__init__((tau * log_prior).to(torch.get_default_dtype()), ignore_index=ignore_index)
        self.tau = tau

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.adjustment.numel()}, tau={self.tau}, "
            f"ignore_index={self.ignore_index}"
        )


class BalancedSoftmaxLoss(_AdjustedCrossEntropy):
    r"""Balanced softmax cross-entropy (Ren et al., NeurIPS 2020).

    .. math::
        \mathcal{L}_\text{BS} = -\frac{1}{|V|} \sum_{i \in V} \log
        \frac{n_{y_i} e^{z_{i,y_i}}}{\sum_c n_c e^{z_{i,c}}}
        = \text{CE}(z_i + \log n, y_i) .

    Buffer ``adjustment`` ``(C,)`` holds :math:`\log n`. Used only in the loss: predict with
    the raw logits.

    Args:
        class_counts: training-set count per class, ``(C,)``, all > 0.
        ignore_index: label ignored in ``labels`` (``None``: every label is a class).
    """

    def __init__(
        self, class_counts: torch.Tensor | Sequence[float], *, ignore_index: int | None = 255
    ) -> None:
        counts = _check_class_counts(class_counts)
        super().__init__(torch.log(counts).to(torch.get_default_dtype()), ignore_index=ignore_index)

    def extra_repr(self) -> str:
        return f"num_classes={self.adjustment.numel()}, ignore_index={self.ignore_index}"


class LDAMLoss(_AdjustedCrossEntropy):
    r"""Label-distribution-aware margin loss with deferred re-weighting (LDAM-DRW; Cao et
    al., NeurIPS 2019).

    Class :math:`c` with :math:`n_c` training samples gets the margin
    :math:`\Delta_c \propto n_c^{-1/4}`, scaled so that the rarest class's is
    ``max_margin``; the true class's logit is lowered by its margin and the logits are
    scaled by :math:`s` before the cross-entropy:

    .. math::
        \mathcal{L}_\text{LDAM} = \frac{1}{\sum_{i \in V} w_{y_i}} \sum_{i \in V}
        -w_{y_i} \log \frac{e^{s (z_{i,y_i} - \Delta_{y_i})}}
        {e^{s (z_{i,y_i} - \Delta_{y_i})} + \sum_{c \ne y_i} e^{s z_{i,c}}} .

    The paper's logits are cosines (normalised features and class vectors), hence
    ``scale=30``; build the model with a cosine classifier (``CifarResNet(...,
    cosine_classifier=True)``) for that recipe, or use ``scale=1`` with a plain linear one.

    Deferred re-weighting: the class weights :math:`w` are 1 until epoch
    ``drw_start_epoch`` (0-based; ``None``: never), then the inverse effective numbers
    :math:`(1 - \beta) / (1 - \beta^{n_c})` normalised to sum ``C`` (Cui et al. 2019),
    :math:`\beta` = ``drw_beta``. The engine reports the epoch with :meth:`set_epoch`
    before each training epoch (so a resumed run re-weights from the same epoch); the
    paper's CIFAR schedule starts it at epoch 160 of 200.

    Args:
        class_counts: training-set count per class, ``(C,)``, all > 0.
        max_margin: the largest margin :math:`\Delta`, > 0 (paper: 0.5).
        scale: :math:`s` > 0 (paper: 30 with cosine logits).
        drw_start_epoch: first epoch of the re-weighting, or ``None``.
        drw_beta: :math:`\beta \in [0, 1)` of the effective numbers (paper: 0.9999).
        ignore_index: label ignored in ``labels`` (``None``: every label is a class).

    ``forward`` returns ``{"loss", "ce"}``, the (weighted) margin cross-entropy.
    """

    margins: torch.Tensor
    drw_weights: torch.Tensor

    def __init__(
        self,
        class_counts: torch.Tensor | Sequence[float],
        *,
        max_margin: float = 0.5,
        scale: float = 30.0,
        drw_start_epoch: int | None = None,
        drw_beta: float = 0.9999,
        ignore_index: int | None = 255,
    ) -> None:
        counts = _check_class_counts(class_counts)
        super().__init__(None, ignore_index=ignore_index)
        self.max_margin = check_positive(max_margin, "max_margin")
        self.scale = check_positive(scale, "scale")
        if drw_start_epoch is not None and (
            isinstance(drw_start_epoch, bool)
            or not isinstance(drw_start_epoch, int)
            or drw_start_epoch < 0
        ):
            raise ValueError(
                f"drw_start_epoch must be None or an int >= 0, got {drw_start_epoch!r}"
            )
        self.drw_start_epoch = drw_start_epoch
        self.drw_beta = check_probability(drw_beta, "drw_beta")
        if self.drw_beta >= 1.0:
            raise ValueError(f"drw_beta must lie in [0, 1), got {drw_beta}")
        margins = counts.pow(-0.25)
        margins = margins * (self.max_margin / margins.max())
        dtype = torch.get_default_dtype()
        self.register_buffer("margins", margins.to(dtype))
        weights = class_balanced_weights(counts, "effective", self.drw_beta)
        self.register_buffer("drw_weights", weights.to(dtype))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Tell the loss which (0-based) training epoch starts: it decides the re-weighting."""
        self.epoch = int(epoch)

    @property
    def reweighting(self) -> bool:
        """Whether the deferred re-weighting is on at the current epoch."""
        return self.drw_start_epoch is not None and self.epoch >= self.drw_start_epoch

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return the LDAM cross-entropy of ``logits`` ``(N, C)`` or ``(B, C, H, W)``."""
        if logits.ndim in (2, 4) and logits.shape[1] != self.margins.numel():
            raise ValueError(
                f"logits must have {self.margins.numel()} classes in dim 1 "
                f"(len(class_counts)), got shape {tuple(logits.shape)}"
            )
        labels = self._validate(logits, labels)
        dtype = loss_compute_dtype(logits.dtype)
        logits = logits.to(dtype)
        valid = valid_label_mask(labels, self.ignore_index)
        target = torch.where(valid, labels, torch.zeros_like(labels))
        margin = self.margins.to(dtype)[target]  # (N,) or (B, H, W)
        true_class = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(dtype)
        adjusted = self.scale * (logits - true_class * margin.unsqueeze(1))
        per_position = F.cross_entropy(adjusted, target, reduction="none")
        weight = valid.to(dtype)
        if self.reweighting:
            weight = weight * self.drw_weights.to(dtype)[target]
        ce = (per_position * weight).sum() / weight.sum().clamp_min(1e-12)
        return {"loss": ce, "ce": ce}

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.margins.numel()}, max_margin={self.max_margin}, "
            f"scale={self.scale}, drw_start_epoch={self.drw_start_epoch}, "
            f"drw_beta={self.drw_beta}, ignore_index={self.ignore_index}"
        )
