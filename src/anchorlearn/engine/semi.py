"""Semi-supervised training step: a labelled batch through the run's objective plus a
FixMatch consistency loss on unlabelled images (Sohn et al. 2020, FixMatch, NeurIPS), and
optionally SAR's pull on the confidently pseudo-labelled ones.

The batches are :class:`~anchorlearn.engine.datamodules.SemiSupervisedBatch` es of
:class:`~anchorlearn.engine.datamodules.ClassificationDataModule` with a
``labelled_fraction``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anchorlearn._checks import check_non_negative, check_probability
from anchorlearn.losses.sar import SemanticAnchorRegularizer

from .config import OptimConfig
from .datamodules import SemiSupervisedBatch
from .module import SupervisedModule, upsample_logits
from .objective import Objective

__all__ = ["SemiSupervisedModule"]


class SemiSupervisedModule(SupervisedModule):
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

    def semi_supervised_loss(self, batch: SemiSupervisedBatch) -> dict[str, Any]:
        """Steps 1-5 of the class docstring for one batch.

        Returns ``{"loss"}`` (the total, with gradient), ``"terms"`` (the objective's
        detached terms on the labelled images, plus ``"<sar term>/pull_unlabelled"``),
        ``"labelled_logits"``, ``"unlabelled_loss"``, ``"mask"`` ``(M,)`` bool,
        ``"pseudo_labels"`` ``(M,)``.
        """
        n_labelled, n_unlabelled = batch.images.shape[0], batch.weak.shape[0]
        if batch.strong.shape[0] != n_unlabelled:
            raise ValueError(
                f"the weak and strong views must hold the same images, got {n_unlabelled} "
                f"and {batch.strong.shape[0]}"
            )
        if n_unlabelled == 0:
            raise ValueError("a semi-supervised batch needs at least one unlabelled image")
        logits, features = self.model(torch.cat([batch.images, batch.weak, batch.strong]))
        sizes = [n_labelled, n_unlabelled, n_unlabelled]
        labelled_logits, weak_logits, strong_logits = logits.split(sizes)
        labelled_features, _, strong_features = features.split(sizes)
        out = self.objective(
            labelled_logits, labelled_features, batch.labels, upsample=upsample_logits
        )
        with torch.no_grad():
            confidence, pseudo = torch.softmax(weak_logits.detach().float(), dim=1).max(dim=1)
            mask = confidence >= self.threshold
        per_image = F.cross_entropy(strong_logits.float(), pseudo, reduction="none")
        unlabelled_loss = (per_image * mask.to(per_image.dtype)).mean()
        total = out.pop("loss") + self.unlabelled_weight * unlabelled_loss
        if self.sar_unlabelled:
            for name, term in self.sar_terms:
                pull = term.pull_loss(strong_features[mask], pseudo[mask])
                total = total + term.pull_weight * pull.float()
                out[f"{name}/pull_unlabelled"] = pull.detach().float()
        return {
            "loss": total,
            "terms": out,
            "labelled_logits": labelled_logits,
            "unlabelled_loss": unlabelled_loss,
            "mask": mask,
            "pseudo_labels": pseudo,
        }

    def training_step(self, batch: Any, batch_idx: int):
        if not isinstance(batch, SemiSupervisedBatch):
            return super().training_step(batch, batch_idx)
        result = self.semi_supervised_loss(batch)
        labels, mask = batch.labels, result["mask"]
        batch_size = labels.shape[0]
        unlabelled_size = batch.weak.shape[0]
        epoch = {"prog_bar": True, "on_epoch": True, "batch_size": batch_size, "sync_dist": True}
        self.log("train/loss", result["loss"].detach(), **epoch)
        for key, value in result["terms"].items():
            self.log(f"train/{key}", value, batch_size=batch_size)
        logits = result["labelled_logits"]
        self.log("train/acc", (logits.argmax(1) == labels).float().mean(), **epoch)
        unlabelled = {**epoch, "prog_bar": False, "batch_size": unlabelled_size}
        self.log("train/unlabelled_loss", result["unlabelled_loss"].detach(), **unlabelled)
        self.log("train/mask_rate", mask.float().mean(), **unlabelled)
        confident = int(mask.sum())
        if confident:
            # logging only: the hidden labels never reach the loss
            right = result["pseudo_labels"][mask] == batch.hidden_labels[mask]
            self.log("train/pseudo_acc", right.float().mean(), batch_size=confident)
        return result["loss"]
