"""Prototypical contrastive pretraining: the Lightning module (M-step) and the E-step callback.

``ContrastivePretrainModule`` trains a :class:`~anchorlearn.models.moco.MoCo` encoder with
InfoNCE, plus ProtoNCE (``pcl``) or ProtoNCE and the PAUC terms (``pauc``) once an E-step
has produced prototypes. :class:`EStepCallback` runs the E-step at the start of every epoch
after the warm-up: it embeds the training set with the momentum encoder, clusters it at
every granularity (:func:`gather_and_cluster`, DDP-aware) and stores the result in the
module's buffers.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F

from anchorlearn.cluster import estimate_concentration, kmeans
from anchorlearn.losses._checks import check_label_range, connected_zero
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
from .ssl_config import PretrainLossConfig

__all__ = ["ContrastivePretrainModule", "EStepCallback", "EStepResult", "gather_and_cluster"]

LOSS_TERMS = ("infonce", "protonce", "alignment", "uniformity", "correlation")


@dataclass(frozen=True)
class EStepResult:
    """One E-step, a list entry per granularity ``g``.

    Attributes:
        prototypes: ``(k_g, D)`` float32, L2-normalised k-means centroids.
        concentrations: ``(k_g,)`` float32, strictly positive, mean = the temperature.
        assignments: ``(N,)`` int64 in ``[0, k_g)``, the cluster of every training sample.
    """

    prototypes: list[torch.Tensor]
    concentrations: list[torch.Tensor]
    assignments: list[torch.Tensor]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather_rows(features: torch.Tensor, indices: torch.Tensor, num_samples: int) -> torch.Tensor:
    """All ranks' ``(n_r, D)`` rows placed at their ``indices`` in one ``(num_samples, D)``."""
    world = dist.get_world_size()
    count = torch.tensor([features.shape[0]], device=features.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    longest = int(max(int(c) for c in counts))
    padded = features.new_zeros(longest, features.shape[1])
    padded[: features.shape[0]] = features
    padded_idx = indices.new_full((longest,), -1)
    padded_idx[: indices.shape[0]] = indices
    rows = [torch.empty_like(padded) for _ in range(world)]
    idxs = [torch.empty_like(padded_idx) for _ in range(world)]
    dist.all_gather(rows, padded)
    dist.all_gather(idxs, padded_idx)
    all_rows = torch.cat([r[: int(c)] for r, c in zip(rows, counts, strict=True)])
    all_idx = torch.cat([i[: int(c)] for i, c in zip(idxs, counts, strict=True)])
    full = features.new_zeros(num_samples, features.shape[1])
    full[all_idx] = all_rows
    covered = torch.zeros(num_samples, dtype=torch.bool, device=features.device)
    covered[all_idx] = True
    if not bool(covered.all()):
        raise ValueError(
            f"the ranks' indices cover {int(covered.sum())} of {num_samples} samples: every "
            "training sample must be embedded by some rank"
        )
    return full


def gather_and_cluster(
    features: torch.Tensor,
    indices: torch.Tensor,
    num_samples: int,
    num_clusters: Sequence[int],
    *,
    temperature: float = 0.2,
    niter: int = 20,
    nredo: int = 1,
    seed: int = 0,
    backend: str = "auto",
    init: str = "auto",
    warm_start: int | None = None,
) -> EStepResult:
    """The E-step of PCL on embeddings that may be spread over DDP ranks.

    Each rank passes the embeddings ``features`` ``(n_r, D)`` of the training samples it
    embedded and their positions ``indices`` ``(n_r,)`` in the training set of
    ``num_samples`` samples (duplicates across ranks are allowed: the copies are equal).
    Under an initialised ``torch.distributed`` group with more than one rank, the rows are
    gathered, rank 0 clusters them and broadcasts the result, so that every rank returns
    the same :class:`EStepResult`; without one, ``features`` must hold every sample.

    Per granularity ``k`` in ``num_clusters``: :func:`~anchorlearn.cluster.kmeans` (``niter``
    iterations, ``nredo`` restarts, seeded with ``seed``, initialised by ``init``:
    ``"k-means++"``, ``"random"`` or ``"auto"``, the library default; ``warm_start`` as
    there; centroids L2-normalised) and
    :func:`~anchorlearn.cluster.estimate_concentration`, measured to the centroids before
    normalisation (as PCL) and rescaled to mean ``temperature``.
    Collective calls are made on the device of ``features`` (a CUDA tensor under NCCL).
    """
    if features.ndim != 2 or indices.shape != features.shape[:1]:
        raise ValueError(
            f"features must be (n, D) and indices (n,), got {tuple(features.shape)} and "
            f"{tuple(indices.shape)}"
        )
    check_label_range(indices, num_samples, None, "indices")
    ks = [int(k) for k in num_clusters]
    if _distributed():
        full = _gather_rows(features.detach().float(), indices.long(), num_samples)
    else:
        full = features.detach().float().new_zeros(num_samples, features.shape[1])
        full[indices.long()] = features.detach().float()
        if torch.unique(indices).numel() != num_samples:
            raise ValueError(
                f"indices cover {torch.unique(indices).numel()} of {num_samples} samples: "
                "pass the embeddings of the whole training set"
            )
    device, dim = full.device, full.shape[1]
    is_root = not _distributed() or dist.get_rank() == 0
    result = EStepResult([], [], [])
    for g, k in enumerate(ks):
        if k > num_samples:
            raise ValueError(
                f"num_clusters[{g}]={k} exceeds the {num_samples} training samples: use fewer "
                "clusters"
            )
        prototypes = torch.empty(k, dim, device=device)
        assignments = torch.empty(num_samples, dtype=torch.long, device=device)
        phi = torch.empty(k, device=device)
        failure: Exception | None = None
        if is_root:
            try:
                clusters = kmeans(
                    full,
                    k,
                    niter=niter,
                    nredo=nredo,
                    seed=seed + g,
                    backend=backend,
                    init=None if init == "auto" else init,
                    warm_start=warm_start,
                )
                prototypes = clusters.centroids.to(device)
                assignments = clusters.assignments.to(device)
                # as PCL: distances to the cluster means, before they are normalised
                raw = clusters.raw_centroids.to(device)
                phi = estimate_concentration(full, raw, assignments, temperature).float()
            except Exception as err:  # re-raised below, on every rank together
                failure = err
        if _distributed():
            # the other ranks must not wait forever on a broadcast rank 0 never sends
            status = torch.tensor([0 if failure is None else 1], device=device)
            dist.broadcast(status, src=0)
            if int(status) != 0:
                if failure is not None:
                    raise failure
                raise RuntimeError(f"the E-step failed on rank 0 (k={k}); see its error")
            for tensor in (prototypes, assignments, phi):
                dist.broadcast(tensor, src=0)
        elif failure is not None:
            raise failure
        result.prototypes.append(prototypes)
        result.concentrations.append(phi)
        result.assignments.append(assignments)
    return result


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
            PAUCLoss(
                temperature=moco.temperature,
                num_negatives=loss.num_negatives,
                protonce_weight=loss.protonce_weight,
                align_weight=loss.align_weight,
                uniform_weight=loss.uniform_weight,
                corr_weight=loss.corr_weight,
                align_alpha=loss.align_alpha,
                align_view_weight=loss.align_view_weight,
                uniform_t=loss.uniform_t,
                uniform_mode=loss.uniform_mode,
                corr_mode=loss.corr_mode,
                corr_lambda=loss.corr_lambda,
                corr_features=loss.corr_features,
            )
            if method != "moco"
            else None
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
    """Runs the E-step at the start of every epoch from ``warmup_epochs`` on, and times it.

    The training images (``dm.labelled_dataset("train")``, in the order of the training
    indices) are embedded on their un-augmented form (``dm.preprocess``) by the momentum
    encoder, each DDP rank embedding its shard ``rank::world_size``; then
    :func:`gather_and_cluster` (seed ``seed * 1000 + epoch``) and
    :meth:`ContrastivePretrainModule.set_estep`.

    Every epoch logs ``time/estep_s`` (0 without an E-step) and ``time/train_epoch_s`` (the
    epoch without its E-step); both are also kept in :attr:`timings`, one dict per epoch,
    with the E-step's two parts: ``estep_embed_s`` (embedding the training set) and
    ``estep_cluster_s`` (:func:`gather_and_cluster`: the gather, k-means at every
    granularity, phi and the broadcast).
    """

    def __init__(
        self,
        warmup_epochs: int,
        *,
        niter: int = 20,
        nredo: int = 1,
        backend: str = "auto",
        init: str = "auto",
        warm_start: int | None = None,
        seed: int = 0,
        batch_size: int = 1024,
        verbose: bool = True,
    ) -> None:
        self.warmup_epochs = warmup_epochs
        self.niter = niter
        self.nredo = nredo
        self.backend = backend
        self.init = init
        self.warm_start = warm_start
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
        rank, world = trainer.global_rank, trainer.world_size
        began = time.perf_counter()
        indices = torch.arange(rank, images.shape[0], world)
        chunks = []
        for start in range(0, indices.shape[0], self.batch_size):
            batch = images[indices[start : start + self.batch_size]].to(module.device)
            chunks.append(module.moco.embed(dm.preprocess(batch), momentum=True).float())
        dim = module.moco.dim
        features = torch.cat(chunks) if chunks else torch.empty(0, dim, device=module.device)
        embedded = time.perf_counter()
        result = gather_and_cluster(
            features,
            indices.to(module.device),
            images.shape[0],
            module.num_clusters,
            temperature=module.moco.temperature,
            niter=self.niter,
            nredo=self.nredo,
            seed=self.seed * 1000 + trainer.current_epoch,
            backend=self.backend,
            init=self.init,
            warm_start=self.warm_start,
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
        if pl_module.uses_prototypes and trainer.current_epoch >= self.warmup_epochs:
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
