"""Semi-supervised training step: a labelled batch through the run's objective plus a
FixMatch consistency loss on unlabelled images (Sohn et al. 2020, FixMatch, NeurIPS), and
optionally SAR's pull on the confidently pseudo-labelled ones (images, or pixels).

The batches are :class:`~anchorlearn.engine.datamodules.SemiSupervisedBatch` es of
:class:`~anchorlearn.engine.datamodules.ClassificationDataModule` or
:class:`~anchorlearn.engine.segmentation.SegmentationFilesDataModule` with a
``labelled_fraction``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anchorlearn._checks import check_non_negative, check_probability
from anchorlearn.losses.sar import SemanticAnchorRegularizer

from .config import InferenceConfig, OptimConfig
from .datamodules import SemiSupervisedBatch
from .module import SupervisedModule, upsample_logits
from .objective import Objective
from .segmentation import IGNORE_INDEX, SegmentationModule

__all__ = ["SemiSupervisedModule", "SemiSupervisedSegmentationModule"]


def _nearest(values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(M, H, W)`` labels or flags resized to ``size`` by nearest neighbour."""
    if tuple(values.shape[-2:]) == tuple(size):
        return values
    resized = F.interpolate(values[:, None].float(), size=tuple(size), mode="nearest")
    return resized[:, 0].to(values.dtype)


class _SemiSupervisedSteps:
    """The training step of :class:`SemiSupervisedModule` and
    :class:`SemiSupervisedSegmentationModule` (mixed in before their supervised base)."""

    model: nn.Module
    objective: Objective
    task: str

    def _init_semi(
        self,
        objective: Objective,
        threshold: float,
        unlabelled_weight: float,
        sar_unlabelled: bool,
    ) -> None:
        self.threshold = check_probability(threshold, "threshold")
        self.unlabelled_weight = check_non_negative(unlabelled_weight, "unlabelled_weight")
        self.sar_terms: list[tuple[str, SemanticAnchorRegularizer]] = [
            (name, term)
            for name, term in zip(objective.names, objective.terms, strict=True)
            if isinstance(term, SemanticAnchorRegularizer)
        ]
        if sar_unlabelled and not self.sar_terms:
            raise ValueError(
                "sar_unlabelled=True pulls pseudo-labelled features with the objective's SAR "
                f"term, but the objective has none (terms: {', '.join(objective.names)})"
            )
        self.sar_unlabelled = bool(sar_unlabelled)

    def _network_input(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def semi_supervised_loss(self, batch: SemiSupervisedBatch) -> dict[str, Any]:
        """Steps 1-5 of :class:`SemiSupervisedModule` (per pixel for
        :class:`SemiSupervisedSegmentationModule`) for one batch.

        Returns ``{"loss"}`` (the total, with gradient), ``"terms"`` (the objective's
        detached terms on the labelled images, plus ``"<sar term>/pull_unlabelled"``),
        ``"labelled_logits"``, ``"unlabelled_loss"``, ``"mask"`` (``(M,)``, or ``(M, h, w)``
        at the logits' size: confident and valid), ``"valid"`` (the same shape: the
        unlabelled images, or pixels, that count), ``"pseudo_labels"`` (the same shape).
        """
        n_labelled, n_unlabelled = batch.images.shape[0], batch.weak.shape[0]
        if batch.strong.shape != batch.weak.shape:
            raise ValueError(
                "the weak and strong views must hold the same images at the same size, got "
                f"{tuple(batch.weak.shape)} and {tuple(batch.strong.shape)}"
            )
        if n_unlabelled == 0:
            raise ValueError("a semi-supervised batch needs at least one unlabelled image")
        x = self._network_input(torch.cat([batch.images, batch.weak, batch.strong]))
        logits, features = self.model(x)
        sizes = [n_labelled, n_unlabelled, n_unlabelled]
        labelled_logits, weak_logits, strong_logits = logits.split(sizes)
        labelled_features, _, strong_features = features.split(sizes)
        out = self.objective(
            labelled_logits, labelled_features, batch.labels, upsample=upsample_logits
        )
        dense = weak_logits.ndim == 4
        with torch.no_grad():
            confidence, pseudo = torch.softmax(weak_logits.detach().float(), dim=1).max(dim=1)
            if batch.valid is None:
                valid = torch.ones_like(confidence, dtype=torch.bool)
            else:
                valid = _nearest(batch.valid, tuple(confidence.shape[-2:]))
            mask = (confidence >= self.threshold) & valid
        per_sample = F.cross_entropy(strong_logits.float(), pseudo, reduction="none")
        # FixMatch's normalisation: the mean over every unlabelled image (or valid pixel)
        unlabelled_loss = (per_sample * mask.to(per_sample.dtype)).sum() / valid.sum().clamp_min(1)
        total = out.pop("loss") + self.unlabelled_weight * unlabelled_loss
        if self.sar_unlabelled:
            for name, term in self.sar_terms:
                if dense:  # a pseudo-label map, the other pixels ignored
                    targets = torch.where(mask, pseudo, term.ignore_index)
                    pull = term.pull_loss(strong_features, targets)
                else:
                    pull = term.pull_loss(strong_features[mask], pseudo[mask])
                total = total + term.pull_weight * pull.float()
                out[f"{name}/pull_unlabelled"] = pull.detach().float()
        return {
            "loss": total,
            "terms": out,
            "labelled_logits": labelled_logits,
            "unlabelled_loss": unlabelled_loss,
            "mask": mask,
            "valid": valid,
            "pseudo_labels": pseudo,
        }

    def training_step(self, batch: Any, batch_idx: int):
        if not isinstance(batch, SemiSupervisedBatch):
            return super().training_step(batch, batch_idx)  # type: ignore[misc]
        result = self.semi_supervised_loss(batch)
        labels, mask, valid = batch.labels, result["mask"], result["valid"]
        batch_size = labels.shape[0]
        unlabelled_size = batch.weak.shape[0]
        epoch = {"prog_bar": True, "on_epoch": True, "batch_size": batch_size, "sync_dist": True}
        log = self.log  # type: ignore[attr-defined]
        log("train/loss", result["loss"].detach(), **epoch)
        for key, value in result["terms"].items():
            log(f"train/{key}", value, batch_size=batch_size)
        if self.task == "classification":
            logits = result["labelled_logits"]
            log("train/acc", (logits.argmax(1) == labels).float().mean(), **epoch)
        unlabelled = {**epoch, "prog_bar": False, "batch_size": unlabelled_size}
        log("train/unlabelled_loss", result["unlabelled_loss"].detach(), **unlabelled)
        log("train/mask_rate", mask.sum() / valid.sum().clamp_min(1), **unlabelled)
        # logging only: the hidden labels never reach the loss
        hidden = batch.hidden_labels
        if hidden.ndim == 3:
            hidden = _nearest(hidden, tuple(mask.shape[-2:]))
            scored = mask & (hidden != IGNORE_INDEX)
        else:
            scored = mask
        confident = int(scored.sum())
        if confident:
            right = result["pseudo_labels"][scored] == hidden[scored]
            log("train/pseudo_acc", right.float().mean(), batch_size=confident)
        return result["loss"]


class SemiSupervisedModule(_SemiSupervisedSteps, SupervisedModule):
    r"""Classification from a few labelled and many unlabelled images, FixMatch-style
    (Sohn et al. 2020, FixMatch, NeurIPS).

    A training step with a :class:`~anchorlearn.engine.datamodules.SemiSupervisedBatch`
    of ``B`` labelled images ``x_l`` (labels ``y``) and ``M`` unlabelled images seen in a
    weak view ``w`` and a strong view ``s``:

    1. one forward pass of ``cat[x_l, w, s]`` (BatchNorm normalises over all of them);
    2. ``supervised``: the run's objective (CE, logit adjustment, SAR, ...) on the
       labelled logits, features and labels, exactly as :class:`SupervisedModule`;
    3. pseudo-labels ``q_i = argmax softmax(logits(w_i))`` (no gradient), confident when
       ``max softmax(logits(w_i)) >= threshold``;
    4. ``unlabelled = (1 / M) sum_i 1[confident_i] CE(logits(s_i), q_i)``: the mean over
       *all* ``M`` unlabelled images, FixMatch's normalisation;
    5. with ``sar_unlabelled``, for every SAR term of the objective, its pull alone
       (:meth:`~anchorlearn.losses.SemanticAnchorRegularizer.pull_loss`: no second
       auxiliary CE, no second anchor update) on the strong-view features of the confident
       images towards the semantic anchors of their pseudo-labels, times its
       ``pull_weight``;

    ``loss = supervised + unlabelled_weight * unlabelled + sum of the pulls of step 5``.
    The true labels of the unlabelled images are read only to log the accuracy of the
    pseudo-labels. A plain ``(images, labels)`` batch trains as :class:`SupervisedModule`.

    Logged besides :class:`SupervisedModule`'s keys (``train/loss`` is the total,
    ``train/acc`` the labelled accuracy): ``train/unlabelled_loss`` (step 4, unweighted),
    ``train/mask_rate`` (fraction of confident unlabelled images), ``train/pseudo_acc``
    (accuracy of the confident pseudo-labels; on steps with any) and
    ``train/<sar term>/pull_unlabelled`` (step 5, unweighted).

    Args:
        model, objective, optim, num_classes, seed: as :class:`SupervisedModule`
            (classification).
        threshold: confidence a pseudo-label needs, in ``[0, 1]`` (FixMatch: 0.95).
        unlabelled_weight: weight of the consistency loss, >= 0 (FixMatch: 1).
        sar_unlabelled: add step 5; needs a
            :class:`~anchorlearn.losses.SemanticAnchorRegularizer` in ``objective``.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        optim: OptimConfig,
        *,
        num_classes: int,
        seed: int = 0,
        threshold: float = 0.95,
        unlabelled_weight: float = 1.0,
        sar_unlabelled: bool = False,
    ) -> None:
        super().__init__(
            model, objective, optim, task="classification", num_classes=num_classes, seed=seed
        )
        self._init_semi(objective, threshold, unlabelled_weight, sar_unlabelled)


class SemiSupervisedSegmentationModule(_SemiSupervisedSteps, SegmentationModule):
    r"""Semantic segmentation from a few labelled and many unlabelled images, the
    FixMatch recipe of :class:`SemiSupervisedModule` applied per pixel.

    The steps of :class:`SemiSupervisedModule`, with these changes: the weak and the strong
    view of an unlabelled crop are pixel-aligned (the strong one recolours, blurs and cuts
    out a box, nothing geometric, see
    :class:`~anchorlearn.engine.segmentation.SegmentationFilesDataModule`); pseudo-labels
    and confidences are read per cell of the network's logits (at its output stride, e.g.
    1/4 of the crop), the crop's valid pixels (not the padding around a small crop)
    resized to those cells by nearest neighbour (a cell is valid when its top-left pixel
    is); the consistency loss is the mean over every valid cell of ``1[confident] CE``;
    SAR's pull (step 5) acts on the strong view's feature map with the confident
    pseudo-labels and every other cell ignored (resized to the features' size by nearest
    neighbour, as SAR resizes masks). ``train/mask_rate`` is the share of valid cells that
    are confident; ``train/pseudo_acc`` scores the confident cells against the hidden
    masks (logging only). Validation and test as
    :class:`~anchorlearn.engine.segmentation.SegmentationModule`.

    Args:
        model, objective, optim, num_classes, inference, seed, channels_last: as
            :class:`~anchorlearn.engine.segmentation.SegmentationModule`.
        threshold, unlabelled_weight, sar_unlabelled: as :class:`SemiSupervisedModule`.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        optim: OptimConfig,
        *,
        num_classes: int,
        inference: InferenceConfig,
        seed: int = 0,
        channels_last: bool = False,
        threshold: float = 0.95,
        unlabelled_weight: float = 1.0,
        sar_unlabelled: bool = False,
    ) -> None:
        super().__init__(
            model,
            objective,
            optim,
            num_classes=num_classes,
            inference=inference,
            seed=seed,
            channels_last=channels_last,
        )
        self._init_semi(objective, threshold, unlabelled_weight, sar_unlabelled)
        for name, term in self.sar_terms:
            if self.sar_unlabelled and term.ignore_index is None:
                raise ValueError(
                    f"sar_unlabelled=True marks the unconfident pixels with the SAR term's "
                    f"ignore_index, but {name} has none: build it with ignore_index=255"
                )

    def _network_input(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            return images.contiguous(memory_format=torch.channels_last)
        return images
