"""Lightning module that trains any ``(logits, features)`` model with a list of losses."""

from __future__ import annotations

import math
from collections.abc import Iterable

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DistributedSampler

from anchorlearn._checks import valid_label_mask

from .config import OptimConfig
from .objective import Objective

__all__ = [
    "SupervisedModule",
    "average_batchnorm_statistics",
    "batchnorm_statistics",
    "build_optimizer",
    "lr_factor",
    "padded_sampler",
    "parameter_groups",
    "rank_divergence",
    "training_counts",
    "upsample_logits",
]


def parameter_groups(module: nn.Module, cfg: OptimConfig) -> list[dict]:
    """The trainable parameters of ``module`` as optimiser groups.

    A model with ``param_groups()`` (the encoder-decoder segmentation models) puts its
    ``"backbone"`` parameters in a group at ``lr * cfg.backbone_lr_mult``; everything else
    (the head, the losses' own parameters such as SAR's projector) trains at ``lr``.
    """
    trainable = [p for p in module.parameters() if p.requires_grad]
    if cfg.backbone_lr_mult == 1.0:
        return [{"params": trainable, "name": "all"}]
    model = getattr(module, "model", None)
    try:
        named = model.param_groups()
    except AttributeError:
        raise ValueError(
            f"optim.backbone_lr_mult={cfg.backbone_lr_mult} needs a model with a backbone "
            f"(an encoder-decoder segmentation model), got {type(model).__name__}"
        ) from None
    backbone_ids = {id(p) for p in named["backbone"] if p.requires_grad}
    backbone = [p for p in trainable if id(p) in backbone_ids]
    rest = [p for p in trainable if id(p) not in backbone_ids]
    return [
        {"params": backbone, "lr": cfg.lr * cfg.backbone_lr_mult, "name": "backbone"},
        {"params": rest, "lr": cfg.lr, "name": "head"},
    ]


def lr_factor(
    step: int, *, total: int, warmup: int, cfg: OptimConfig, steps_per_unit: int = 1
) -> float:
    """The learning-rate multiplier at optimiser step ``step`` (0-based) of ``total``.

    A linear warm-up over ``warmup`` steps, then ``constant`` (1), ``cosine`` (1 -> 0),
    ``poly`` (``(1 - t) ** poly_power``, t the fraction of the steps after the warm-up; the
    schedule of DeepLab and mmsegmentation) or ``step`` (``gamma ** k`` once ``k`` of
    ``cfg.milestones`` are reached, a milestone ``m`` being step ``m * steps_per_unit``:
    ``steps_per_unit`` is the steps of an epoch for epoch milestones). ``cfg.min_lr`` is a
    floor for ``poly`` and ``cosine``: the factor decays to ``min_lr / lr`` instead of 0.
    """
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        passed = sum(step >= m * steps_per_unit for m in cfg.milestones)
        return cfg.gamma**passed
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    if cfg.schedule == "poly":
        decay = (1.0 - progress) ** cfg.poly_power
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    floor = cfg.min_lr / cfg.lr
    return floor + (1.0 - floor) * decay


def build_optimizer(module: L.LightningModule, cfg: OptimConfig):
    """SGD or AdamW over the trainable parameters of ``module`` (per-module learning rates:
    :func:`parameter_groups`), with a linear warm-up (``cfg.warmup_epochs``, or
    ``cfg.warmup_steps`` for iteration-based runs) and a per-step cosine, poly or constant
    schedule after it (:func:`lr_factor`)."""
    groups = parameter_groups(module, cfg)
    if cfg.name == "sgd":
        opt = torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.schedule == "constant" and cfg.warmup_epochs == 0 and cfg.warmup_steps == 0:
        return opt
    trainer = module.trainer
    total = max(int(trainer.estimated_stepping_batches), 1)
    per_epoch = 1  # milestones of an iteration-based run are steps
    if cfg.warmup_steps:
        warmup = cfg.warmup_steps
    else:
        if trainer.max_steps is None or trainer.max_steps < 0:
            per_epoch = max(total // max(int(trainer.max_epochs or 1), 1), 1)
        warmup = cfg.warmup_epochs * per_epoch

    def factor(step: int) -> float:
        return lr_factor(step, total=total, warmup=warmup, cfg=cfg, steps_per_unit=per_epoch)

    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def batchnorm_statistics(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The running means and variances of every BatchNorm layer in ``module``, by name."""
    stats = []
    for name, layer in module.named_modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.track_running_stats:
            for kind in ("running_mean", "running_var"):
                buffer = getattr(layer, kind)
                if buffer is not None:
                    stats.append((f"{name}.{kind}" if name else kind, buffer))
    return stats


@torch.no_grad()
def average_batchnorm_statistics(module: L.LightningModule) -> None:
    """Replace every BatchNorm running mean and variance of ``module`` by its mean over the
    DDP ranks (nothing on a single process). Buffers are not broadcast from rank 0
    (``broadcast_buffers=False``), so each rank's running statistics follow its own shard;
    averaging them before validation, at every epoch end (so before checkpoints and the
    E-step) gives every rank, and the saved model, one set. Every rank must call it."""
    if module.trainer.world_size <= 1:
        return
    for _, buffer in batchnorm_statistics(module):
        buffer.copy_(module.trainer.strategy.reduce(buffer.clone(), reduce_op="mean"))


def rank_divergence(
    module: L.LightningModule, named_tensors: Iterable[tuple[str, torch.Tensor]]
) -> tuple[float, str]:
    """The largest absolute difference of any of ``named_tensors`` between DDP ranks, and
    the name of the tensor where it occurs; ``(0.0, "")`` on a single process. Every rank
    must call it with the same tensors (it all-gathers)."""
    worst, worst_name = 0.0, ""
    if module.trainer.world_size <= 1:
        return worst, worst_name
    for name, tensor in named_tensors:
        gathered = module.all_gather(tensor.detach().double())
        diff = float((gathered - gathered[0]).abs().max())
        if diff > worst:
            worst, worst_name = diff, name
    return worst, worst_name


def upsample_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Bilinearly resize dense ``(B, C, h, w)`` logits to the label size ``(B, H, W)``."""
    if logits.ndim == 4 and logits.shape[-2:] != labels.shape[-2:]:
        return F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return logits


def padded_sampler(trainer: L.Trainer | None) -> DistributedSampler | None:
    """The distributed sampler of the running validation, when it pads the split.

    Under DDP Lightning gives the validation loader a :class:`DistributedSampler` with
    ``drop_last=False``: it repeats the first samples of the split until every rank gets as
    many. ``None`` when there is no trainer, no validation loader or no such sampler.
    """
    if trainer is None:
        return None
    loaders = trainer.val_dataloaders
    if isinstance(loaders, list | tuple):
        loaders = loaders[0] if loaders else None
    sampler = getattr(loaders, "sampler", None)
    if isinstance(sampler, DistributedSampler) and not sampler.drop_last:
        return sampler
    return None


def training_counts(dm) -> list[int] | None:
    """Per-class training counts of a data module: images, or pixels for segmentation."""
    for name in ("train_class_counts", "train_class_pixel_counts"):
        counts = getattr(dm, name, None)
        if counts is not None:
            return [int(c) for c in counts]
    return None


class SupervisedModule(L.LightningModule):
    """Classification or segmentation training with a composable objective.

    Args:
        model: returns ``(logits, features)``; exposes ``classifier`` and ``feat_dim``.
        objective: the losses (their parameters, e.g. SAR's projector, train with the model).
        optim: optimiser and schedule settings.
        task: ``"classification"`` or ``"segmentation"``.
        num_classes: number of classes.
        ignore_index: label left out of the validation accuracy (segmentation's void label,
            255 in the data modules here); ``None``, for classification: every label counts.
        seed: reseeds torch at every epoch start (``seed * 1000 + epoch``, plus
            ``rank << 32`` on DDP rank ``rank``), so that batch augmentations do not depend
            on whether the run was resumed.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        optim: OptimConfig,
        *,
        task: str,
        num_classes: int,
        ignore_index: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.model = model
        self.objective = objective
        self.optim_cfg = optim
        self.task = task
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.seed = seed
        self._val_correct = 0
        self._val_total = 0
        self._val_seen = 0
        self.rank_state_divergence = 0.0
        self.most_divergent_buffer = ""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(x)

    def on_train_epoch_start(self) -> None:
        # rank r > 0 draws from a stream no other (seed, epoch, rank) uses
        torch.manual_seed(self.seed * 1000 + self.current_epoch + (self.global_rank << 32))
        self.objective.set_epoch(self.current_epoch)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        images, labels = batch
        logits, features = self.model(images)
        out = self.objective(logits, features, labels, upsample=upsample_logits)
        batch_size = images.shape[0]
        # epoch-level values are averaged over the ranks (weighted by their batch sizes)
        epoch = {"prog_bar": True, "on_epoch": True, "batch_size": batch_size, "sync_dist": True}
        self.log("train/loss", out["loss"].detach(), **epoch)
        for key, value in out.items():
            if key != "loss":
                self.log(f"train/{key}", value, batch_size=batch_size)
        if self.task == "classification":
            self.log("train/acc", (logits.argmax(1) == labels).float().mean(), **epoch)
        return out["loss"]

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits, _ = self.model(images)
        logits = upsample_logits(logits, labels)
        valid = valid_label_mask(labels, self.ignore_index)
        valid[self._unpadded_rows(labels.shape[0]) :] = False
        correct = (logits.argmax(1) == labels) & valid
        self._val_correct += int(correct.sum())
        self._val_total += int(valid.sum())

    def _unpadded_rows(self, num_rows: int) -> int:
        """How many of the next ``num_rows`` validation samples of this rank are not padding.

        The padding of :func:`padded_sampler` comes last: rank ``r``'s ``k``-th sample is a
        repeat once ``r + k * world_size >= len(split)``. Leaving the repeats out makes the
        ranks' counts add up to the whole split, every sample once.
        """
        start = self._val_seen
        self._val_seen += num_rows
        sampler = padded_sampler(self._trainer)
        if sampler is None:
            return num_rows
        real = len(range(sampler.rank, len(sampler.dataset), sampler.num_replicas))
        return max(0, min(num_rows, real - start))

    def on_validation_epoch_end(self) -> None:
        """Log the validation accuracy of the whole split: correct and total counts summed
        over the ranks first, so every rank logs the same global value (its ``sync_dist``
        mean over the ranks is that value again)."""
        counts = [self._val_correct, self._val_total]
        stats = torch.tensor(counts, dtype=torch.long, device=self.device)
        stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        acc = int(stats[0]) / max(int(stats[1]), 1)
        name = "val/acc" if self.task == "classification" else "val/pixel_acc"
        self.log(name, acc, prog_bar=True, sync_dist=True)
        self._val_correct = 0
        self._val_total = 0
        self._val_seen = 0

    def on_validation_epoch_start(self) -> None:
        self._val_seen = 0
        average_batchnorm_statistics(self)

    def on_train_epoch_end(self) -> None:
        average_batchnorm_statistics(self)

    def on_train_end(self) -> None:
        """Under DDP, record how far the objective's state (SAR anchors, EMA prototypes,
        step counters) and the model's BatchNorm statistics differ between ranks: 0 when
        the ranks agree exactly."""
        state = [*self.objective.named_buffers(), *batchnorm_statistics(self.model)]
        self.rank_state_divergence, self.most_divergent_buffer = rank_divergence(self, state)

    def configure_optimizers(self):
        return build_optimizer(self, self.optim_cfg)
