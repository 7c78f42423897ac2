"""Prototypical contrastive pretraining: the Lightning module (M-step) and the E-step callback.

``ContrastivePretrainModule`` trains a :class:`~anchorlearn.models.moco.MoCo` encoder with
InfoNCE, plus ProtoNCE (``pcl``) or ProtoNCE and the PAUC terms (``pauc``) once an E-step
has produced prototypes. :class:`EStepCallback` runs the E-step
(:mod:`anchorlearn.cluster.estep`) at the start of every epoch after the warm-up: it embeds
the training set with the momentum encoder, clusters it at every granularity (DDP-aware) and
stores the result in the module's buffers.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F

from anchorlearn._checks import connected_zero
from anchorlearn.cluster.estep import EStepResult, embed_shard, gather_and_cluster
from anchorlearn.losses.contrastive import InfoNCE
from anchorlearn.losses.pauc import PAUCLoss
from anchorlearn.models.moco import MoCo

from .config import OptimConfig
from .module import (
    average_batchnorm_statistics,
    batchnorm_statistics,
    build_optimizer,
    rank_divergence,
)
from .ssl_config import ClusterConfig, PretrainLossConfig, warmup_epochs

__all__ = ["ContrastivePretrainModule", "EStepCallback"]

LOSS_TERMS = ("infonce", "protonce", "alignment", "uniformity", "correlation")


class ContrastivePretrainModule(L.LightningModule):
    r"""MoCo pretraining with optional ProtoNCE and PAUC terms.

    Objective per batch of two views :math:`(x^1, x^2)` with training-set indices ``index``:

    .. math::
        \mathcal{L} = w_i\,\mathrm{InfoNCE}(q, k, \text{queue})
            + \mathrm{PAUCLoss}(q, a[\text{index}], C, \phi, k)

    where the second term (ProtoNCE plus the alignment, uniformity and correlation terms,
    each with its own weight, see :class:`~anchorlearn.losses.pauc.PAUCLoss`) is present
    for ``pcl`` and ``pauc`` once an E-step has run; before that (the warm-up) and for
    ``moco`` only InfoNCE trains. Every term is logged at every step (0 when inactive).

    Args:
        moco: the encoder pair, head and queue.
        loss: the weights and options of the terms.
        optim: optimiser and schedule (per-step cosine after a linear warm-up).
        method: ``"moco"``, ``"pcl"`` or ``"pauc"``.
        num_clusters: the granularities ``k_g`` of the E-step.
        num_samples: training-set size ``N``.
        seed: reseeds torch at every epoch start (``seed * 1000 + epoch``, plus
            ``rank << 32`` on DDP rank ``rank``).

    Buffers (E-step results, no gradient; saved in checkpoints, identical on all ranks):
        ``prototypes_{g}`` ``(k_g, dim)``, ``concentrations_{g}`` ``(k_g,)``,
        ``assignments_{g}`` ``(N,)`` (-1 before the first E-step) and ``estep_epoch``, the
        epoch of the last E-step (-1: none yet).
    """

    estep_epoch: torch.Tensor

    def __init__(
        self,
        moco: MoCo,
        loss: PretrainLossConfig,
        optim: OptimConfig,
        *,
        method: str,
        num_clusters: Sequence[int],
        num_samples: int,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.moco = moco
        self.method = method
        self.optim_cfg = optim
        self.seed = seed
        self.num_clusters = [int(k) for k in num_clusters]
        self.num_samples = int(num_samples)
        self.infonce_weight = float(loss.infonce_weight)
        self.infonce = InfoNCE(moco.temperature)
        self.proto_loss = (
            PAUCLoss.from_params(loss, temperature=moco.temperature) if method != "moco" else None
        )
        for g, k in enumerate(self.num_clusters):
            self.register_buffer(f"prototypes_{g}", torch.zeros(k, moco.dim))
            self.register_buffer(f"concentrations_{g}", torch.full((k,), moco.temperature))
            self.register_buffer(
                f"assignments_{g}", torch.full((self.num_samples,), -1, dtype=torch.long)
            )
        self.register_buffer("estep_epoch", torch.tensor(-1, dtype=torch.long))
        self.rank_state_divergence = 0.0

    @property
    def uses_prototypes(self) -> bool:
        """Whether the method has an E-step (``pcl``, ``pauc``)."""
        return self.proto_loss is not None

    @property
    def prototypes(self) -> list[torch.Tensor]:
        """Per granularity ``(k_g, dim)``, the last E-step's normalised centroids."""
        return [getattr(self, f"prototypes_{g}") for g in range(len(self.num_clusters))]

    @property
    def concentrations(self) -> list[torch.Tensor]:
        """Per granularity ``(k_g,)``."""
        return [getattr(self, f"concentrations_{g}") for g in range(len(self.num_clusters))]

    @property
    def assignments(self) -> list[torch.Tensor]:
        """Per granularity ``(N,)`` cluster index of every training sample."""
        return [getattr(self, f"assignments_{g}") for g in range(len(self.num_clusters))]

    @torch.no_grad()
    def set_estep(self, result: EStepResult, epoch: int) -> None:
        """Copy an E-step result into the buffers (shapes must match the granularities)."""
        if len(result.prototypes) != len(self.num_clusters):
            raise ValueError(
                f"E-step result has {len(result.prototypes)} granularities, expected "
                f"{len(self.num_clusters)}"
            )
        for buffers, values in (
            (self.prototypes, result.prototypes),
            (self.concentrations, result.concentrations),
            (self.assignments, result.assignments),
        ):
            for buffer, value in zip(buffers, values, strict=True):
                if buffer.shape != value.shape:
                    raise ValueError(
                        f"E-step tensor of shape {tuple(value.shape)} does not fit the buffer "
                        f"of shape {tuple(buffer.shape)}"
                    )
                buffer.copy_(value)
        self.estep_epoch.fill_(epoch)

    def on_train_epoch_start(self) -> None:
        # rank r > 0 draws from a stream no other (seed, epoch, rank) uses
        torch.manual_seed(self.seed * 1000 + self.current_epoch + (self.global_rank << 32))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], _: int):
        view1, view2, index = batch
        out = self.moco(view1, view2)
        # Re-normalised in float32: under bf16/fp16 autocast the embeddings' norms are off by
        # more than the losses' 1e-3 tolerance.
        q, k, queue = (F.normalize(out[key].float(), dim=1) for key in ("q", "k", "queue"))
        infonce = self.infonce(q, k, queue)["loss"]
        zero = connected_zero(q)
        terms = dict.fromkeys(LOSS_TERMS, zero)
        terms["infonce"] = infonce
        loss = self.infonce_weight * infonce
        if self.proto_loss is not None and int(self.estep_epoch) >= 0:
            assignments = [a[index] for a in self.assignments]
            proto = self.proto_loss(q, assignments, self.prototypes, self.concentrations, k=k)
            loss = loss + proto["loss"]
            for name in LOSS_TERMS[1:]:
                terms[name] = proto[name]
        log = {"on_epoch": True, "batch_size": view1.shape[0], "sync_dist": True}
        self.log("train/loss", loss.detach(), prog_bar=True, **log)
        for name, value in terms.items():
            self.log(f"train/{name}", value.detach(), **log)
        return loss

    def on_train_epoch_end(self) -> None:
        # before the next E-step embeds the training set with the momentum encoder
        average_batchnorm_statistics(self)

    def on_train_end(self) -> None:
        """Under DDP, record in :attr:`rank_state_divergence` the largest difference between
        ranks of the E-step buffers, the queue and the encoders' BatchNorm statistics: 0
        when the ranks agree exactly."""
        buffers = [*self.prototypes, *self.concentrations, *self.assignments, self.moco.queue]
        state = [*((str(i), b) for i, b in enumerate(buffers)), *batchnorm_statistics(self)]
        self.rank_state_divergence, _ = rank_divergence(self, state)

    def configure_optimizers(self):
        return build_optimizer(self, self.optim_cfg)


class EStepCallback(L.Callback):
    """Runs the E-step at the start of every epoch after the warm-up
    (:func:`~anchorlearn.engine.ssl_config.warmup_epochs` of ``cluster`` and the trainer's
    ``max_epochs``), and times it.

    The training images (``dm.labelled_dataset("train")``, in the order of the training
    indices) are embedded on their un-augmented form (``dm.preprocess``) by the momentum
    encoder, each DDP rank embedding its shard ``rank::world_size``
    (:func:`~anchorlearn.cluster.estep.embed_shard`); then
    :func:`~anchorlearn.cluster.estep.gather_and_cluster` into ``cluster.num_clusters``
    groups with the k-means settings of ``cluster`` (seed ``seed * 1000 + epoch``,
    concentrations rescaled to the encoder's temperature) and
    :meth:`ContrastivePretrainModule.set_estep`.

    Every epoch logs ``time/estep_s`` (0 without an E-step) and ``time/train_epoch_s`` (the
    epoch without its E-step); both are also kept in :attr:`timings`, one dict per epoch,
    with the E-step's two parts: ``estep_embed_s`` (embedding the training set) and
    ``estep_cluster_s`` (the gather, k-means at every granularity, phi and the broadcast).
    """

    def __init__(
        self,
        cluster: ClusterConfig,
        *,
        seed: int = 0,
        batch_size: int = 1024,
        verbose: bool = True,
    ) -> None:
        self.cluster = cluster
        self.seed = seed
        self.batch_size = batch_size
        self.verbose = verbose
        self.timings: list[dict[str, float]] = []
        self._epoch_start = 0.0
        self._estep_seconds = 0.0
        self._estep_parts = {"estep_embed_s": 0.0, "estep_cluster_s": 0.0}

    @torch.no_grad()
    def run_estep(self, trainer: L.Trainer, module: ContrastivePretrainModule) -> EStepResult:
        """Embed the training set (this rank's shard) and cluster it; store the result."""
        dm = trainer.datamodule
        images = dm.labelled_dataset("train").tensors[0]
        c = self.cluster
        began = time.perf_counter()
        features, indices = embed_shard(
            lambda batch: module.moco.embed(dm.preprocess(batch), momentum=True),
            images,
            module.moco.dim,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            batch_size=self.batch_size,
            device=module.device,
        )
        embedded = time.perf_counter()
        result = gather_and_cluster(
            features,
            indices,
            images.shape[0],
            c.num_clusters,
            temperature=module.moco.temperature,
            niter=c.niter,
            nredo=c.nredo,
            seed=self.seed * 1000 + trainer.current_epoch,
            backend=c.backend,
            init=c.init,
            warm_start=c.warm_start,
        )
        module.set_estep(result, trainer.current_epoch)
        self._estep_parts = {
            "estep_embed_s": embedded - began,
            "estep_cluster_s": time.perf_counter() - embedded,
        }
        return result

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._estep_seconds = 0.0
        self._estep_parts = {"estep_embed_s": 0.0, "estep_cluster_s": 0.0}
        warmup = warmup_epochs(self.cluster, int(trainer.max_epochs or 0))
        # a run resumed with more epochs has a later warm-up by the fraction, but its
        # prototypes exist already: they are refreshed every epoch, never left to go stale
        started = int(pl_module.estep_epoch) >= 0
        if pl_module.uses_prototypes and (trainer.current_epoch >= warmup or started):
            start = time.perf_counter()
            self.run_estep(trainer, pl_module)
            self._estep_seconds = time.perf_counter() - start
            if self.verbose and trainer.is_global_zero:
                parts = self._estep_parts
                print(
                    f"E-step epoch {trainer.current_epoch}: {self._estep_seconds:.1f} s "
                    f"(embedding {parts['estep_embed_s']:.1f} s, "
                    f"clustering {parts['estep_cluster_s']:.1f} s)",
                    file=sys.stderr,
                )
        self._epoch_start = time.perf_counter()

    def state_dict(self) -> dict:
        """The per-epoch timings, kept in checkpoints so a resumed run reports them all."""
        return {"timings": [dict(row) for row in self.timings]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.timings = [dict(row) for row in state_dict.get("timings", [])]

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch_seconds = time.perf_counter() - self._epoch_start
        self.timings.append(
            {
                "epoch": trainer.current_epoch,
                "estep_s": self._estep_seconds,
                **self._estep_parts,
                "train_epoch_s": epoch_seconds,
            }
        )
        pl_module.log("time/estep_s", self._estep_seconds, on_epoch=True, sync_dist=True)
        pl_module.log("time/train_epoch_s", epoch_seconds, on_epoch=True, sync_dist=True)
