"""Cross-entropy task losses for long-tailed data, all taking LOGITS (not features).

* :class:`CrossEntropyLoss`: plain (optionally label-smoothed) cross-entropy.
* :class:`LogitAdjustedLoss`: logit-adjusted loss (Menon et al., "Long-tail learning via
  logit adjustment", ICLR 2021).
* :class:`BalancedSoftmaxLoss`: balanced softmax (Ren et al., "Balanced Meta-Softmax for
  Long-Tailed Visual Recognition", NeurIPS 2020).

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
    check_probability,
    loss_compute_dtype,
    valid_label_mask,
)

__all__ = ["BalancedSoftmaxLoss", "CrossEntropyLoss", "LogitAdjustedLoss"]


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
