"""Semantic Anchor Regularization (SAR).

Ge et al., "Beyond Prototypes: Semantic Anchor Regularization for Better Representation
Learning", AAAI 2024 (arXiv 2312.11872). Fixed random anchors are made semantic by a
projector trained through the task's own classifier, kept as an EMA once every anchor is
confidently classified, and the learned features are pulled towards them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from anchorlearn._checks import (
    check_ignore_index,
    check_non_negative,
    check_num_classes,
    check_positive_int,
    check_probability,
    check_seed,
    connected_zero,
    loss_compute_dtype,
    valid_label_mask,
    validate_features_and_labels,
)
from anchorlearn._geometry import riesz_uniform_points, seed_or_draw, simplex_etf

__all__ = ["SemanticAnchorRegularizer", "class_balanced_weights", "default_projector"]

Classifier = nn.Module | Callable[[torch.Tensor], torch.Tensor]

ANCHOR_INITS = ("gaussian", "etf", "uniform")
PULLS = ("l2", "cosine", "l2_margin")
GATES = ("all", "per_class")
# the smallest norm a feature or an anchor counts with in the cosine pull: a zero feature
# has cosine 0 with every anchor (pull 1) and a finite gradient
_COSINE_EPS = 1e-8


def default_projector(feat_dim: int) -> nn.Sequential:
    """The release's anchor projector: three ``Linear(D, D)``-``BatchNorm``-``ReLU`` blocks.

    The release writes the third block as a 1x1 convolution on ``(C, D, 1, 1)``, which is the
    same map as a linear layer on ``(C, D)``. Biases are omitted because BatchNorm follows.
    """
    layers: list[nn.Module] = []
    for _ in range(3):
        layers += [nn.Linear(feat_dim, feat_dim, bias=False), nn.BatchNorm1d(feat_dim), nn.ReLU()]
    return nn.Sequential(*layers)


class SemanticAnchorRegularizer(nn.Module):
    r"""Semantic Anchor Regularization: pull features towards classifier-aware anchors.

    Each training step, with ``C`` classes and ``D`` feature channels:

    1. ``P = g(A0)``: the fixed anchors ``A0`` (``C x D``, drawn once; by default from
       N(0, 1), see ``anchor_init``) through the trainable projector ``g``.
    2. Auxiliary CE through the task's own ``classifier``: row ``i`` of ``classifier(P)``
       has target ``i``. With ``ce_i`` the per-anchor CE and ``p_i = exp(-ce_i)``, anchors
       with ``p_i > filter_conf`` count as solved and
       ``aux = sum_i w_i ce_i``, ``w_i = log p_i / (sum_j log p_j + 1e-9)`` over the
       unsolved anchors (equivalently ``sum ce_i^2 / sum ce_j``; zero once all are solved).
       Its gradient reaches the projector and the classifier.
    3. Gate (``P`` detached; ``m = ema_momentum``; anchor ``i`` *passes* when it is
       argmax-correct and ``p_i > update_conf``).
       ``gate="all"`` (the release): if every anchor passes, the semantic anchors ``S`` are
       set to ``P`` the first time and updated as ``S <- m S + (1 - m) P`` afterwards;
       otherwise nothing changes.
       ``gate="per_class"``: each row on its own: if anchor ``i`` passes, ``S[i]`` is set to
       ``P[i]`` the first time (class ``i`` *opens* and is *ready* from then on) and updated
       as ``S[i] <- m S[i] + (1 - m) P[i]`` afterwards; rows of anchors that fail are left
       as they are.
    4. Pull, with ``S`` as updated in the same step: the mean over valid positions of a
       distance ``d`` between ``f`` and ``S[y]``: ``||f - S[y]||^2 / D`` (``pull="l2"``, the
       release), ``1 - cos(f, S[y])`` (``pull="cosine"``) or the hinge
       ``max(0, ||f - S[y]||^2 / D - margin)`` (``pull="l2_margin"``: a feature already
       within ``margin`` of its anchor is not pulled); with ``class_weights`` ``w`` the mean
       becomes ``sum_i w[y_i] d_i / sum_i w[y_i]``. Its gradient reaches only ``features``.
       ``gate="all"``: on gated steps only (a step failing the gate has no pull).
       ``gate="per_class"``: on every step, over the valid positions whose class is ready
       (opened on this or an earlier step, whether or not it passed this step); positions
       of classes not yet open count neither in the sum nor in the mean, and while no
       class of the batch is ready the pull is zero.

    ``loss = aux_weight * aux_ce + pull_weight * pull``. The returned ``aux_ce`` and ``pull``
    are unweighted; both are always present (zero while inactive) so that loss keys agree
    across steps and DDP ranks; an inactive pull is a zero still connected to ``features``.
    Nothing reaches ``anchors`` or ``semantic_anchors``. Both terms are computed and returned
    in float32 (float64 for float64 inputs) whatever the dtype of ``features`` or the
    autocast state: a float16 batch is never summed in float16.

    In ``eval()`` mode no state changes: the auxiliary CE is reported with the projector in
    eval mode and the pull is measured against ``S`` if the gate has ever opened (with
    ``gate="per_class"``: on the positions of the ready classes only).

    :meth:`pull_loss` computes the pull alone for a second batch of the same step (no
    auxiliary CE, no gate or EMA update), e.g. pseudo-labelled features in semi-supervised
    training.

    Under DDP the gate decision is the same on every rank: it reads only the projected
    anchors and the classifier, which DDP keeps identical across ranks (never the batch);
    so ``S``, ``step``, ``gate_open_step`` and ``class_open_step`` agree without any
    communication.

    Args:
        num_classes: number of classes ``C`` (>= 2).
        feat_dim: feature channels ``D``.
        classifier: the model's own final layer: ``nn.Linear(D, C)``, ``nn.Conv2d(D, C, 1)``
            (applied to the anchors reshaped to ``(C, D, 1, 1)``), or any callable mapping a
            ``(C, D)`` tensor to ``(C, C)`` logits. It is *not* registered as a submodule:
            it belongs to (and is saved and moved with) the model.
        pull_weight: weight of the pull loss (release: 0.1).
        aux_weight: weight of the auxiliary CE (release: 1.0).
        filter_conf: own-class probability above which an anchor counts as solved in the
            hard-anchor weighting (release: 0.9).
        update_conf: own-class probability every anchor (``gate="all"``) or a class's own
            anchor (``gate="per_class"``) must exceed to pass the gate (release: 0.8).
        ema_momentum: momentum ``m`` of the semantic-anchor EMA (release: 0.999).
        ignore_index: label value excluded from the pull (``None``: every label is a class;
            the engine passes ``None`` for classification, 255 for segmentation).
        projector: module mapping ``(C, D)`` to ``(C, D)``; ``None`` builds
            :func:`default_projector`.
        gate_warn_steps: warn once if the gate is still shut after this many training steps
            (``gate="per_class"``: if any class is still not open, naming those classes).
        seed: seed of the generator that draws the fixed anchors (``None``: torch's global
            generator). The anchors are a buffer drawn when the module is built; under DDP
            every rank must draw the same ones, so pass the same ``seed`` on every rank (or
            seed every rank alike before building, as the engine does): DDP with
            ``broadcast_buffers=False``, as the engine runs it, does not copy rank 0's.
        anchor_init: how ``A0`` is drawn. ``"gaussian"`` (the release): N(0, 1) entries.
            ``"etf"``: the rows of a simplex equiangular tight frame
            (:func:`~anchorlearn.models.etf.simplex_etf`: unit rows, pairwise cosine exactly
            ``-1/(C-1)``; needs ``feat_dim >= num_classes``). ``"uniform"``: ``C`` points
            spread on the unit sphere by minimising the Riesz 1-energy
            (``anchorlearn._geometry.riesz_uniform_points``: 500 projected gradient steps,
            any ``C``, ``C > D + 1`` included; ``O(C^2 D)`` per step when the module is
            built). The unit rows of ``"etf"`` and ``"uniform"`` are scaled by ``sqrt(D)``,
            the typical norm of a Gaussian anchor, so that only their directions differ from
            the release's. Both draw from a generator seeded with ``seed``, or, when ``seed``
            is ``None``, with a seed drawn from torch's global generator, so that seeding
            torch reproduces them as it does the Gaussian anchors.
        pull: the distance the pull averages: ``"l2"`` (the release),
            ``||f - S[y]||^2 / D``; ``"cosine"``, ``1 - cos(f, S[y])`` (norms clamped
            below at 1e-8, so a zero feature gives 1 and a finite gradient); or
            ``"l2_margin"``, ``max(0, ||f - S[y]||^2 / D - margin)`` (zero gradient for the
            features within the margin; ``margin=0`` gives exactly ``"l2"``).
        class_weights: optional ``(C,)`` finite, non-negative weights, not all zero, of the
            positions of each class in the pull (see :func:`class_balanced_weights`): the
            pull is ``sum_i w[y_i] d_i / sum_i w[y_i]`` over the valid positions, so equal
            weights give the unweighted mean and a class of weight 0 is not pulled. Kept as
            a non-persistent buffer: it moves with ``.to()`` but is not in ``state_dict``
            (it is a setting, passed again when the module is rebuilt). ``None``: unweighted.
        gate: ``"all"`` (the release): ``S`` starts and moves only on steps where every
            anchor passes; or ``"per_class"``: each class's row of ``S`` starts and moves on
            the steps where its own anchor passes, and each class is pulled once it has
            opened (see steps 3 and 4). With many classes the release's gate can stay shut
            for a long time (every one of ``C`` anchors must pass on the same step); the
            per-class gate pulls the classes that are ready meanwhile. ``"per_class"`` adds
            the buffer ``class_open_step`` ``(C,)`` (the step each class opened, -1 until
            then) to ``state_dict`` (so a checkpoint of one gate does not load strictly into
            a module built with the other); ``gate_open_step`` is then the step the first
            class opened, and :attr:`gate_ever_opened` is true once any class has.
            :meth:`reference_points` returns ``S`` only once every class has opened
            (``None`` before: rows of classes not yet open are not anchors).
        margin: the hinge of ``pull="l2_margin"`` (>= 0, in the units of
            ``||f - S[y]||^2 / D``); a non-zero margin needs ``pull="l2_margin"``.

    Shapes:
        ``features`` ``(N, D)`` with ``labels`` ``(N,)``, or ``(B, D, H, W)`` with ``labels``
        ``(B, H', W')``, resized to ``(H, W)`` by nearest neighbour.

    Returns:
        ``{"loss", "aux_ce", "pull"}`` scalar tensors, ``"gate_open"`` (bool: the pull
        was active this step; always ``False`` in ``eval()`` mode, where nothing is gated)
        and ``"gate_open_fraction"`` (float32 scalar tensor: the fraction of classes whose
        row of ``S`` is ready after this step's update; ``gate="all"``: 1.0 once the gate
        has ever opened, else 0.0, even on a later step that fails the gate).
    """

    anchors: torch.Tensor
    semantic_anchors: torch.Tensor
    class_weights: torch.Tensor | None
    step: torch.Tensor
    gate_open_step: torch.Tensor
    class_open_step: torch.Tensor  # gate="per_class" only

    def __init__(
        self,
        num_classes: int,
        feat_dim: int,
        classifier: Classifier,
        *,
        pull_weight: float = 0.1,
        aux_weight: float = 1.0,
        filter_conf: float = 0.9,
        update_conf: float = 0.8,
        ema_momentum: float = 0.999,
        ignore_index: int | None = 255,
        projector: nn.Module | None = None,
        gate_warn_steps: int = 1000,
        seed: int | None = None,
        anchor_init: str = "gaussian",
        pull: str = "l2",
        class_weights: torch.Tensor | None = None,
        gate: str = "all",
        margin: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        self.feat_dim = check_positive_int(feat_dim, "feat_dim")
        if not callable(classifier):
            raise TypeError(
                "classifier must be an nn.Linear, an nn.Conv2d or a callable mapping (C, D) "
                f"to (C, C) logits, got {type(classifier).__name__}"
            )
        _check_classifier_layer(classifier, self.num_classes, self.feat_dim)
        # A plain attribute, deliberately not a submodule: the classifier is the model's.
        self.__dict__["classifier"] = classifier
        self.pull_weight = check_non_negative(pull_weight, "pull_weight")
        self.aux_weight = check_non_negative(aux_weight, "aux_weight")
        self.filter_conf = check_probability(filter_conf, "filter_conf")
        self.update_conf = check_probability(update_conf, "update_conf")
        _check_reachable_gate(classifier, self.num_classes, self.update_conf)
        self.ema_momentum = check_probability(ema_momentum, "ema_momentum")
        self.ignore_index = check_ignore_index(ignore_index)
        self.gate_warn_steps = check_positive_int(gate_warn_steps, "gate_warn_steps")
        if projector is None:
            projector = default_projector(self.feat_dim)
        elif not isinstance(projector, nn.Module):
            raise TypeError(f"projector must be an nn.Module, got {type(projector).__name__}")
        self.projector = projector
        self.anchor_init = _check_choice(anchor_init, "anchor_init", ANCHOR_INITS)
        self.pull = _check_choice(pull, "pull", PULLS)
        self.gate = _check_choice(gate, "gate", GATES)
        self.margin = check_non_negative(margin, "margin")
        if self.margin != 0 and self.pull != "l2_margin":
            raise ValueError(
                f"margin={self.margin} needs pull='l2_margin', got pull={self.pull!r}: the "
                "margin is the hinge of the l2_margin pull (use margin=0 with other pulls)"
            )
        weights = _check_class_weights(class_weights, self.num_classes)
        anchors = _initial_anchors(
            self.anchor_init, self.num_classes, self.feat_dim, check_seed(seed)
        )

        self.register_buffer("anchors", anchors)
        self.register_buffer("semantic_anchors", torch.zeros(self.num_classes, self.feat_dim))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("gate_open_step", torch.full((), -1, dtype=torch.long))
        if self.gate == "per_class":
            # only then: the release's state_dict (gate="all") keeps its keys
            self.register_buffer(
                "class_open_step", torch.full((self.num_classes,), -1, dtype=torch.long)
            )
        self.register_buffer("class_weights", weights, persistent=False)
        self._warned_gate = False
        # gate="all": whether the latest training-mode forward passed the gate (its pull was
        # active); read by pull_loss, never saved
        self._gate_passed = False

    @property
    def gate_ever_opened(self) -> bool:
        """Whether the semantic anchors have been initialised (``gate="per_class"``: those of
        at least one class)."""
        return bool(self.gate_open_step >= 0)

    @property
    def classes_ready(self) -> torch.Tensor:
        """``(C,)`` bool: the classes whose row of ``S`` has started (``gate="all"``: all of
        them once the gate has opened, none before)."""
        if self.gate == "per_class":
            return self.class_open_step >= 0
        return (self.gate_open_step >= 0).expand(self.num_classes).clone()

    def reference_points(self) -> tuple[str, torch.Tensor] | None:
        """``("semantic anchors", S)``, ``S`` a detached float32 CPU copy ``(C, D)`` of the
        semantic anchors, once every class has its semantic anchor; ``None`` before.

        ``gate="all"``: once the gate has opened. ``gate="per_class"``: once every class
        has opened; while some have not, ``None`` (their rows of ``S`` are not anchors yet,
        and a partial set would be plotted and measured as if it were one)."""
        if not self.gate_ever_opened:
            return None
        if self.gate == "per_class" and not bool(self.classes_ready.all()):
            return None
        return "semantic anchors", self.semantic_anchors.detach().float().cpu().clone()

    def projected_anchors(self) -> torch.Tensor:
        """``projector(anchors)``, ``(C, D)``, in the module's current train/eval mode."""
        projected = self.projector(self.anchors)
        if projected.shape != self.anchors.shape:
            raise ValueError(
                f"projector must map ({self.num_classes}, {self.feat_dim}) to the same shape, "
                f"got {tuple(projected.shape)}"
            )
        return projected

    def anchor_logits(self, projected: torch.Tensor) -> torch.Tensor:
        """Classify the ``(C, D)`` projected anchors with the task classifier: ``(C, C)``."""
        classifier = self.classifier
        weight = getattr(classifier, "weight", None)
        if isinstance(weight, torch.Tensor) and not torch.is_autocast_enabled():
            projected = projected.to(weight.dtype)
        if isinstance(classifier, nn.Conv2d):
            logits = classifier(projected[:, :, None, None]).flatten(1)
        else:
            logits = classifier(projected)
        expected = (self.num_classes, self.num_classes)
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != expected:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
            raise ValueError(
                f"classifier must map the ({self.num_classes}, {self.feat_dim}) anchors to "
                f"{expected} logits, got {got}"
            )
        return logits

    def _validated_labels(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = validate_features_and_labels(
            features,
            labels,
            feat_dim=self.feat_dim,
            num_classes=self.num_classes,
            ignore_index=self.ignore_index,
        )
        if features.device != self.anchors.device:
            raise ValueError(
                f"features are on {features.device} but SemanticAnchorRegularizer is on "
                f"{self.anchors.device}: move it with .to(device)"
            )
        return labels

    def _pull(
        self, features: torch.Tensor, labels: torch.Tensor, ready: torch.Tensor | None
    ) -> torch.Tensor:
        """The unweighted pull of ``features`` towards ``S[labels]`` (step 4), over the
        ``ready`` classes when given."""
        return _masked_pull(
            features,
            labels,
            self.semantic_anchors,
            self.ignore_index,
            kind=self.pull,
            class_weights=self.class_weights,
            classes=ready,
            margin=self.margin,
        )

    def pull_loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The unweighted pull term alone (step 4) of more features, against the semantic
        anchors ``S`` as they stand, for a second batch within the same training step (e.g.
        confidently pseudo-labelled images in semi-supervised training).

        Nothing else runs: no projector, no auxiliary CE, no gate, no EMA step; no buffer
        changes. The pull is active as it was for the latest :meth:`forward`: in training
        mode, ``gate="all"``, only if that step passed the gate; ``gate="per_class"``, over
        the classes ready after it; in ``eval()`` mode, as :meth:`forward` in eval mode.
        Called right after :meth:`forward` on the same ``features`` and ``labels`` it equals
        that forward's ``"pull"``. Weight it with ``pull_weight`` to add it to a loss. An
        inactive pull, or an empty batch, is a zero connected to ``features``.

        Shapes as :meth:`forward`; ``N = 0`` is allowed.
        """
        labels = self._validated_labels(features, labels)
        ready: torch.Tensor | None = None
        if self.gate == "per_class":
            ready = self.classes_ready
            active = bool(ready.any())
        elif self.training:
            active = self._gate_passed
        else:
            active = self.gate_ever_opened
        if not active:
            return connected_zero(features)
        return self._pull(features, labels, ready)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> dict:
        labels = self._validated_labels(features, labels)
        projected = self.projected_anchors()
        logits = self.anchor_logits(projected)
        logits = logits.to(loss_compute_dtype(logits.dtype))
        targets = torch.arange(self.num_classes, device=logits.device)
        ce = F.cross_entropy(logits, targets, reduction="none")
        aux_ce = _hard_anchor_weighted_ce(ce, self.filter_conf)

        gate_open = False
        ready: torch.Tensor | None = None
        if self.gate == "per_class":
            if self.training:
                ready = self._update_per_class(logits.detach(), ce.detach(), projected)
            else:
                ready = self.classes_ready
            use_pull = bool(ready.any())
            gate_open = use_pull and self.training
            fraction = ready.to(torch.float32).mean()
        else:
            if self.training:
                gate_open = self._update_semantic_anchors(logits.detach(), ce.detach(), projected)
                self._gate_passed = gate_open
            use_pull = gate_open or (not self.training and self.gate_ever_opened)
            fraction = torch.full(
                (), float(self.gate_ever_opened), dtype=torch.float32, device=self.anchors.device
            )
        if use_pull:
            pull = self._pull(features, labels, ready)
        else:
            pull = connected_zero(features)
        loss = self.aux_weight * aux_ce + self.pull_weight * pull
        return {
            "loss": loss,
            "aux_ce": aux_ce,
            "pull": pull,
            "gate_open": gate_open,
            "gate_open_fraction": fraction,
        }

    @torch.no_grad()
    def _update_per_class(
        self, logits: torch.Tensor, ce: torch.Tensor, projected: torch.Tensor
    ) -> torch.Tensor:
        """The per-class gate: start or EMA-update the rows of ``S`` whose anchor passes;
        returns the ``(C,)`` bool mask of the classes ready after the update."""
        self.step += 1
        passes, own_prob = self._passes(logits, ce)
        was_ready = self.class_open_step >= 0
        first = passes & ~was_ready
        moves = passes & was_ready
        new = projected.detach().to(self.semantic_anchors.dtype)
        # the same operations as the all-classes gate's EMA, row by row
        ema = self.semantic_anchors.mul(self.ema_momentum).add_(new, alpha=1 - self.ema_momentum)
        updated = torch.where(moves[:, None], ema, self.semantic_anchors)
        self.semantic_anchors.copy_(torch.where(first[:, None], new, updated))
        self.class_open_step.copy_(torch.where(first, self.step, self.class_open_step))
        first_ever = (self.gate_open_step < 0) & first.any()
        self.gate_open_step.copy_(torch.where(first_ever, self.step, self.gate_open_step))
        ready = was_ready | passes
        if not self._warned_gate and int(self.step) >= self.gate_warn_steps:
            if not bool(ready.all()):
                self._warn_classes_shut(ready, own_prob)
        return ready

    def _passes(self, logits: torch.Tensor, ce: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(C,)`` bool: which anchors are argmax-correct with own-class probability above
        ``update_conf``; and those probabilities."""
        own_prob = torch.exp(-ce)
        correct = logits.argmax(dim=1) == torch.arange(self.num_classes, device=logits.device)
        return correct & (own_prob > self.update_conf), own_prob

    def _warn(self, failing: torch.Tensor, own_prob: torch.Tensor, what: str, who: str) -> None:
        """Warn once: ``what`` happened, the ``failing`` anchors (``who``) and their
        probabilities (the first ten), and what to try."""
        self._warned_gate = True
        indices = torch.nonzero(failing).flatten().tolist()
        shown = ", ".join(f"{i} (p={float(own_prob[i]):.2f})" for i in indices[:10])
        more = f" and {len(indices) - 10} more" if len(indices) > 10 else ""
        warnings.warn(
            f"SemanticAnchorRegularizer: {what}. {who} (need argmax-correct and "
            f"p > update_conf={self.update_conf}): {shown}{more}. Consider a lower "
            "update_conf, a higher aux_weight or a longer training.",
            RuntimeWarning,
            stacklevel=4,
        )

    def _warn_classes_shut(self, ready: torch.Tensor, own_prob: torch.Tensor) -> None:
        what = (
            f"the per-class gate has not opened for {int((~ready).sum())} of "
            f"{self.num_classes} classes after {int(self.step)} steps, so their positions "
            "are not pulled"
        )
        self._warn(~ready, own_prob, what, "Classes still shut")

    @torch.no_grad()
    def _update_semantic_anchors(
        self, logits: torch.Tensor, ce: torch.Tensor, projected: torch.Tensor
    ) -> bool:
        self.step += 1
        passes, own_prob = self._passes(logits, ce)
        if not bool(passes.all()):
            if not self.gate_ever_opened and int(self.step) >= self.gate_warn_steps:
                self._warn_gate_shut(passes, own_prob)
            return False
        new = projected.detach().to(self.semantic_anchors.dtype)
        if self.gate_ever_opened:
            self.semantic_anchors.mul_(self.ema_momentum).add_(new, alpha=1 - self.ema_momentum)
        else:
            self.semantic_anchors.copy_(new)
            self.gate_open_step.fill_(int(self.step))
        return True

    def _warn_gate_shut(self, passes: torch.Tensor, own_prob: torch.Tensor) -> None:
        if self._warned_gate:
            return
        what = f"the gate has not opened after {int(self.step)} steps, so the pull loss is inactive"
        self._warn(~passes, own_prob, what, "Anchors failing it")

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, feat_dim={self.feat_dim}, "
            f"pull_weight={self.pull_weight}, aux_weight={self.aux_weight}, "
            f"filter_conf={self.filter_conf}, update_conf={self.update_conf}, "
            f"ema_momentum={self.ema_momentum}, ignore_index={self.ignore_index}, "
            f"anchor_init={self.anchor_init!r}, pull={self.pull!r}, "
            f"class_weights={None if self.class_weights is None else 'tensor'}, "
            f"gate={self.gate!r}, margin={self.margin}"
        )


def class_balanced_weights(
    counts: Sequence[int] | torch.Tensor, kind: str = "inverse", beta: float = 0.999
) -> torch.Tensor:
    r"""Per-class weights from per-class training counts ``n_c``, for ``class_weights``.

    ``kind="inverse"``: ``1 / n_c``. ``kind="effective"``: the inverse effective number of
    samples of Cui et al., "Class-Balanced Loss Based on Effective Number of Samples",
    CVPR 2019: ``(1 - beta) / (1 - beta^n_c)`` (``beta`` in ``[0, 1)``; ``beta -> 1`` tends
    to the inverse frequency, ``beta = 0`` gives equal weights). A class with ``n_c = 0``
    gets weight 0. The weights are normalised to mean 1 over the ``C`` classes (they sum to
    ``C``, as in Cui et al.); a float32 tensor of shape ``(C,)``.
    """
    if isinstance(counts, torch.Tensor):
        if counts.is_complex() or counts.dtype == torch.bool:
            raise TypeError(f"counts must hold real numbers, got dtype {counts.dtype}")
        values = counts.detach().to("cpu", torch.float64)
    else:
        if isinstance(counts, (str, bytes)) or not isinstance(counts, Sequence):
            raise TypeError(f"counts must be a sequence or a tensor, got {type(counts).__name__}")
        if any(isinstance(c, bool) or not isinstance(c, (int, float)) for c in counts):
            raise TypeError(f"counts must hold real numbers, got {list(counts)!r}")
        values = torch.tensor([float(c) for c in counts], dtype=torch.float64)
    if values.ndim != 1 or values.numel() < 2:
        raise ValueError(
            f"counts must be 1-D with one entry per class (>= 2), got shape {tuple(values.shape)}"
        )
    if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
        raise ValueError(f"counts must be finite and >= 0, got {values.tolist()}")
    if not bool((values > 0).any()):
        raise ValueError(f"counts must have at least one positive entry, got {values.tolist()}")
    kind = _check_choice(kind, "kind", ("inverse", "effective"))
    beta = check_probability(beta, "beta")
    present = values > 0
    if kind == "inverse":
        raw = torch.where(present, 1.0 / values.clamp_min(1e-300), 0.0)
    else:
        if beta >= 1.0:
            raise ValueError(f"beta must lie in [0, 1) for kind='effective', got {beta}")
        raw = torch.where(present, (1.0 - beta) / (1.0 - beta**values), 0.0)
    return (raw * (values.numel() / raw.sum())).to(torch.float32)


def _check_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    allowed = ", ".join(repr(c) for c in choices)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {allowed}, got {type(value).__name__} {value!r}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def _check_class_weights(weights: object, num_classes: int) -> torch.Tensor | None:
    """``None``, or ``weights`` as a float tensor after checking it is a usable ``(C,)``
    weighting: finite, non-negative, not all zero."""
    if weights is None:
        return None
    if not isinstance(weights, torch.Tensor):
        raise TypeError(
            f"class_weights must be None or a torch.Tensor, got {type(weights).__name__}"
        )
    if weights.dtype == torch.bool or weights.is_complex():
        raise TypeError(f"class_weights must hold real numbers, got dtype {weights.dtype}")
    if tuple(weights.shape) != (num_classes,):
        raise ValueError(
            f"class_weights must have shape ({num_classes},) (num_classes,), "
            f"got {tuple(weights.shape)}"
        )
    weights = weights.detach().to(torch.get_default_dtype()).clone()
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError(f"class_weights must be finite and >= 0, got {weights.tolist()}")
    if not bool((weights > 0).any()):
        raise ValueError(f"class_weights must not be all zero, got {weights.tolist()}")
    return weights


def _initial_anchors(
    anchor_init: str, num_classes: int, feat_dim: int, seed: int | None
) -> torch.Tensor:
    """The fixed anchors ``A0``, ``(C, D)`` in the default dtype (see the class docstring)."""
    if anchor_init == "gaussian":
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        return torch.randn(num_classes, feat_dim, generator=generator)
    if anchor_init == "etf" and feat_dim < num_classes:
        raise ValueError(
            f"anchor_init='etf' needs feat_dim >= num_classes, got num_classes={num_classes} "
            f"and feat_dim={feat_dim}; use anchor_init='uniform', which spreads any number of "
            "anchors on the sphere"
        )
    if anchor_init == "uniform" and feat_dim < 2:
        raise ValueError(f"anchor_init='uniform' needs feat_dim >= 2, got feat_dim={feat_dim}")
    seed = seed_or_draw(seed)
    if anchor_init == "etf":
        unit = simplex_etf(feat_dim, num_classes, seed=seed).T
    else:
        unit = riesz_uniform_points(num_classes, feat_dim, seed=seed)
    return (math.sqrt(feat_dim) * unit).to(torch.get_default_dtype()).contiguous()


def _check_reachable_gate(classifier: Classifier, num_classes: int, update_conf: float) -> None:
    """A classifier whose logits are bounded by ``b`` (its ``logit_bound``, e.g. cosine
    logits: ``b = 1``) gives an anchor at most ``e^2b / (e^2b + C - 1)`` of its class's
    probability; at or below ``update_conf`` the gate could never open."""
    bound = getattr(classifier, "logit_bound", None)
    if bound is None:
        return
    best = 1.0 / (1.0 + (num_classes - 1) * math.exp(-2.0 * float(bound)))
    if best <= update_conf:
        raise ValueError(
            f"classifier's logits are bounded by {bound} ({type(classifier).__name__}), so an "
            f"anchor's own-class probability is at most {best:.3f} with {num_classes} "
            f"classes, never above update_conf={update_conf}: the gate could never open; use "
            "a linear classifier with SAR, or scale the bounded logits in the model"
        )


def _check_classifier_layer(classifier: Classifier, num_classes: int, feat_dim: int) -> None:
    if isinstance(classifier, nn.Linear):
        got = (classifier.in_features, classifier.out_features)
        if got != (feat_dim, num_classes):
            raise ValueError(
                f"classifier must be nn.Linear({feat_dim}, {num_classes}) "
                f"(feat_dim, num_classes), got nn.Linear{got}"
            )
    elif isinstance(classifier, nn.Conv2d):
        got = (classifier.in_channels, classifier.out_channels)
        if got != (feat_dim, num_classes) or classifier.kernel_size != (1, 1):
            raise ValueError(
                f"classifier must be nn.Conv2d({feat_dim}, {num_classes}, kernel_size=1), got "
                f"nn.Conv2d({got[0]}, {got[1]}, kernel_size={classifier.kernel_size})"
            )


def _hard_anchor_weighted_ce(ce: torch.Tensor, filter_conf: float) -> torch.Tensor:
    """``sum_i w_i ce_i`` with ``w_i = log p_i / (sum_j log p_j + 1e-9)``, ``p_i > filter_conf``
    counted as 1 (``log p_i = 0``). ``log p_i = -ce_i`` exactly, so no probability underflows.
    """
    unsolved = torch.exp(-ce.detach()) <= filter_conf
    log_p = torch.where(unsolved, -ce, torch.zeros_like(ce))
    weights = log_p / (log_p.sum() + 1e-9)
    return (weights * ce).sum()


def _masked_pull(
    features: torch.Tensor,
    labels: torch.Tensor,
    anchors: torch.Tensor,
    ignore_index: int | None,
    *,
    kind: str = "l2",
    class_weights: torch.Tensor | None = None,
    classes: torch.Tensor | None = None,
    margin: float = 0.0,
) -> torch.Tensor:
    """Mean over valid positions of ``d = ||f - anchors[y]||^2 / D`` (``kind="l2"``),
    ``d = 1 - cos(f, anchors[y])`` (``kind="cosine"``) or
    ``d = max(0, ||f - anchors[y]||^2 / D - margin)`` (``kind="l2_margin"``), in float32 or
    wider; with ``class_weights`` ``w``, the weighted mean ``sum w[y] d / sum w[y]`` (zero
    when no valid position has a positive weight). ``classes``: an optional ``(C,)`` bool
    mask; positions whose label is not in it count as void.

    Per-position gather for ``(N, D)``. For ``(B, D, H, W)`` see :class:`_DenseSquaredDistance`:
    no one-hot map and no ``(B, D, H, W)`` target is kept alive; the cosine reads the ``(B, C,
    HW)`` dot products with every unit anchor. ``anchors`` get no gradient.
    """
    dtype = torch.promote_types(torch.promote_types(features.dtype, anchors.dtype), torch.float32)
    with torch.autocast(features.device.type, enabled=False):
        feats = features.to(dtype)
        anchors = anchors.detach().to(dtype)
        valid = valid_label_mask(labels, ignore_index)
        safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
        if classes is not None:
            valid = valid & classes.to(valid.device)[safe_labels]
        if class_weights is None:
            weights = valid.to(dtype)
            denominator = valid.sum().clamp_min(1)
        else:
            weights = class_weights.to(dtype)[safe_labels] * valid
            weight_sum = weights.sum()
            denominator = torch.where(weight_sum > 0, weight_sum, torch.ones_like(weight_sum))
        d = feats.shape[1]
        if kind == "cosine":
            return (_cosine_distance(feats, safe_labels, anchors) * weights).sum() / denominator
        # the hinge on ||f - a||^2 rather than on its mean over channels: the same value,
        # divided by D below; margin 0 runs exactly the operations of kind="l2"
        margin_sq = float(margin) * d if kind == "l2_margin" else 0.0
        if feats.ndim == 2:
            per_position = (feats - anchors[safe_labels]).pow(2).sum(dim=1)
            if margin_sq > 0:
                per_position = F.relu(per_position - margin_sq)
            total = (per_position * weights).sum()
        else:
            b, _, h, w = feats.shape
            total = _DenseSquaredDistance.apply(
                feats.reshape(b, d, h * w),
                safe_labels.reshape(b, h * w),
                weights.reshape(b, h * w),
                anchors.t().contiguous(),
                margin_sq,
            )
        return total / (denominator * d)


def _cosine_distance(
    feats: torch.Tensor, labels: torch.Tensor, anchors: torch.Tensor
) -> torch.Tensor:
    """``1 - cos(f, anchors[y])`` per position: ``(N,)`` for ``(N, D)`` features, ``(B, H, W)``
    for ``(B, D, H, W)``; both norms clamped below at ``_COSINE_EPS``."""
    units = anchors / anchors.norm(dim=1, keepdim=True).clamp_min(_COSINE_EPS)
    if feats.ndim == 2:
        dots = (feats * units[labels]).sum(dim=1)
    else:
        b, d, h, w = feats.shape
        all_dots = torch.einsum("cd,bdn->bcn", units, feats.reshape(b, d, h * w))
        dots = all_dots.gather(1, labels.reshape(b, 1, h * w)).reshape(b, h, w)
    return 1.0 - dots / feats.norm(dim=1).clamp_min(_COSINE_EPS)


class _DenseSquaredDistance(torch.autograd.Function):
    """``sum_{b, n} valid[b, n] * ||feats[b, :, n] - anchors_t[:, labels[b, n]]||^2``, or
    with ``margin_sq > 0`` the hinge ``sum valid * max(0, ||f - a_y||^2 - margin_sq)``.

    ``feats`` ``(B, D, HW)``, ``labels`` and ``valid`` ``(B, HW)``, ``anchors_t`` ``(D, C)``;
    ``valid`` is a float weight per position (1 or 0, or a class weight for a valid one).
    The target columns are gathered one batch item at a time and worked on in place, so the
    forward holds one ``(D, HW)`` temporary and the backward only its ``(B, D, HW)`` result,
    ``2 * valid * (f - a_y)``, recomputed rather than saved (with a margin, ``valid`` is
    zeroed where the hinge is flat: the positions within the margin get no gradient).
    """

    @staticmethod
    def forward(
        ctx,
        feats: torch.Tensor,
        labels: torch.Tensor,
        valid: torch.Tensor,
        anchors_t: torch.Tensor,
        margin_sq: float = 0.0,
    ) -> torch.Tensor:
        total = feats.new_zeros(())
        active = valid.clone() if margin_sq > 0 else valid
        for i in range(feats.shape[0]):
            sq = anchors_t.index_select(1, labels[i]).sub_(feats[i]).square_()
            if margin_sq > 0:
                dist = sq.sum(0)
                active[i].mul_(dist > margin_sq)
                total += torch.dot(dist.sub_(margin_sq).clamp_min_(0), valid[i])
            else:
                total += torch.dot(sq.sum(0), valid[i])
        ctx.save_for_backward(feats, labels, active, anchors_t)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        feats, labels, valid, anchors_t = ctx.saved_tensors
        grad_feats = torch.empty_like(feats)
        for i in range(feats.shape[0]):
            torch.sub(feats[i], anchors_t.index_select(1, labels[i]), out=grad_feats[i])
            grad_feats[i].mul_(valid[i] * (2 * grad))
        return grad_feats, None, None, None, None
