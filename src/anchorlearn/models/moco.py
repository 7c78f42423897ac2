"""MoCo: a query encoder, a momentum key encoder and a queue of negative keys (He et al. 2020).

The version here is MoCo v2 (Chen et al. 2020: MLP head, temperature 0.2), the base of PCL.

Batch statistics: the query batch and the key batch are forwarded separately, but both
hold the same images, so with ordinary BatchNorm the query of an image and its positive key
are normalised with statistics of the same set of samples, a signature that the negatives
from the queue (other batches) lack; the contrastive task can use it to find the positive
instead of learning features. MoCo breaks it with Shuffle-BN across devices. Here
``split_bn=G`` does it on each device (each DDP rank on its own batch), as MoCo's
single-device demo: every ``BatchNorm2d`` of both encoders becomes a
:class:`~anchorlearn.models.split_bn.SplitBatchNorm2d` normalising ``G`` chunks of the
batch separately, and the key batch is randomly permuted before the key encoder (and put
back after), so a key's chunk is a random group of samples, not its query's chunk.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from anchorlearn._dist import all_gather_cat, is_distributed
from anchorlearn.models.split_bn import split_batchnorm

__all__ = ["MoCo"]


class _Encoder(nn.Module):
    """Backbone features followed by a projection head; outputs un-normalised ``(N, dim)``."""

    def __init__(self, backbone: nn.Module, feat_dim: int, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.feat_dim = feat_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        forward_features = getattr(self.backbone, "forward_features", None)
        out = forward_features(x) if callable(forward_features) else self.backbone(x)
        if isinstance(out, (tuple, list)):
            if len(out) != 2:
                raise ValueError(
                    "backbone must return features (N, F) or (logits, features), "
                    f"got a {type(out).__name__} of length {len(out)}"
                )
            out = out[1]
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] != self.feat_dim:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"backbone features must have shape (N, {self.feat_dim}), got {got}")
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MoCo(nn.Module):
    r"""Momentum Contrast with a queue of negative keys.

    ``forward(x_q, x_k)`` computes L2-normalised queries :math:`q = f_q(x_q)` (with gradient)
    and keys :math:`k = f_k(x_k)` (without), and the InfoNCE logits

    .. math:: \ell_i = [\,q_i\cdot k_i,\; q_i\cdot n_1, \dots, q_i\cdot n_K\,] / \tau

    against the queue :math:`\{n_j\}` (positives in column 0). In training mode it first
    applies the momentum update and afterwards enqueues the keys, as the reference MoCo does;
    in eval mode it changes neither encoder nor queue.

    The key encoder is a deep copy of the query encoder (backbone + head) taken at
    construction; its parameters have ``requires_grad=False`` and change only through
    :meth:`momentum_update`, :math:`\theta_k \leftarrow m\,\theta_k + (1 - m)\,\theta_q`.
    Its buffers (BatchNorm statistics) evolve from its own forward passes.

    Args:
        backbone: module with ``forward_features(x) -> (N, feat_dim)`` (used when present),
            or whose ``forward`` returns ``(N, feat_dim)`` features or ``(logits, features)``.
        feat_dim: the backbone's feature dimension.
        dim: embedding dimension (MoCo/PCL: 128).
        hidden_dim: hidden width of the MLP head (default ``feat_dim``, as MoCo v2).
        queue_size: number of negative keys :math:`K` (MoCo: 65536, PCL on ImageNet: 16384).
        momentum: :math:`m \in [0, 1]` (0.999).
        temperature: :math:`\tau > 0` of the returned logits (0.2).
        mlp: two-layer MLP head (MoCo v2) if ``True``, else a linear projection (v1).
        split_bn: 0 (default) keeps the backbone's BatchNorm; ``G >= 2`` converts every
            ``BatchNorm2d`` of both encoders to a ``SplitBatchNorm2d`` with ``G`` chunks and,
            in training mode, shuffles the keys' batch order for the key encoder (see the
            module docstring); the backbone must contain a ``BatchNorm2d`` and is converted
            in place. The ``state_dict`` keys do not change, and eval mode (``embed``) is
            unaffected.

    Buffers:
        ``queue`` ``(dim, K)`` of L2-normalised keys (random unit vectors at start) and
        ``queue_ptr`` ``(1,)`` long, the column the next key goes to. Both round-trip through
        ``state_dict`` and move with ``.to()``.

    Shapes:
        ``x_q``, ``x_k``: backbone inputs with the same batch size ``N``. ``forward`` returns
        ``{"q": (N, dim), "k": (N, dim), "logits": (N, 1 + K), "labels": (N,) zeros,
        "queue": (K, dim)}``; ``"queue"`` holds the negatives used (a copy taken before the
        enqueue), so that ``InfoNCE()(q, k, queue)`` reproduces the loss of the logits.
    """

    queue: torch.Tensor
    queue_ptr: torch.Tensor

    def __init__(
        self,
        backbone: nn.Module,
        feat_dim: int,
        *,
        dim: int = 128,
        hidden_dim: int | None = None,
        queue_size: int = 4096,
        momentum: float = 0.999,
        temperature: float = 0.2,
        mlp: bool = True,
        split_bn: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
        for name, value in (("feat_dim", feat_dim), ("dim", dim), ("queue_size", queue_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if hidden_dim is not None and (
            isinstance(hidden_dim, bool) or not isinstance(hidden_dim, int) or hidden_dim < 1
        ):
            raise ValueError(f"hidden_dim must be None or an int >= 1, got {hidden_dim!r}")
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
        if not float(temperature) > 0.0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if (
            isinstance(split_bn, bool)
            or not isinstance(split_bn, int)
            or split_bn < 0
            or split_bn == 1
        ):
            raise ValueError(f"split_bn must be 0 (off) or an int >= 2, got {split_bn!r}")
        self.dim = dim
        self.queue_size = queue_size
        self.momentum = float(momentum)
        self.temperature = float(temperature)
        self.split_bn = split_bn

        hidden = feat_dim if hidden_dim is None else hidden_dim
        head: nn.Module = (
            nn.Sequential(
                nn.Linear(feat_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim)
            )
            if mlp
            else nn.Linear(feat_dim, dim)
        )
        self.encoder_q = _Encoder(backbone, feat_dim, head)
        if split_bn and split_batchnorm(self.encoder_q, split_bn) == 0:
            raise ValueError(
                f"split_bn={split_bn} needs a backbone with BatchNorm2d layers, "
                f"got a {type(backbone).__name__} without any"
            )
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for param in self.encoder_k.parameters():
            param.requires_grad_(False)

        self.register_buffer("queue", F.normalize(torch.randn(dim, queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self) -> None:
        r""":math:`\theta_k \leftarrow m\,\theta_k + (1 - m)\,\theta_q` for every parameter."""
        for param_q, param_k in zip(
            self.encoder_q.parameters(), self.encoder_k.parameters(), strict=True
        ):
            param_k.mul_(self.momentum).add_(param_q.detach(), alpha=1.0 - self.momentum)

    @torch.no_grad()
    def dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` ``(B, dim)`` into the queue at ``queue_ptr`` and advance it.

        Under an initialised ``torch.distributed`` process group the keys of all ranks are
        gathered first (every rank must call this with the same ``B``), so every rank holds
        the same queue. The write wraps around the end of the queue, so ``queue_size`` need
        not be a multiple of the global batch; a global batch larger than the queue keeps
        only its last ``queue_size`` keys.
        """
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must have shape (B, {self.dim}), got {tuple(keys.shape)}")
        keys = keys.detach()
        if is_distributed():
            keys = all_gather_cat(keys)
        batch = keys.shape[0]
        ptr = int(self.queue_ptr)
        if batch >= self.queue_size:
            keys = keys[-self.queue_size :]
            ptr = (ptr + batch - self.queue_size) % self.queue_size
        columns = (ptr + torch.arange(keys.shape[0], device=self.queue.device)) % self.queue_size
        self.queue[:, columns] = keys.t().to(self.queue.dtype)
        self.queue_ptr[0] = (ptr + keys.shape[0]) % self.queue_size

    def forward(self, x_q: torch.Tensor, x_k: torch.Tensor) -> dict[str, torch.Tensor]:
        q = F.normalize(self.encoder_q(x_q), dim=1)
        with torch.no_grad():
            if self.training:
                self.momentum_update()
            k = F.normalize(self._encode_keys(x_k), dim=1)
        if k.shape[0] != q.shape[0]:
            raise ValueError(
                f"x_k must have the batch size of x_q ({q.shape[0]}), got {k.shape[0]}"
            )
        queue = self.queue.t().clone()
        positives = (q * k).sum(dim=1, keepdim=True)
        logits = torch.cat([positives, q @ queue.to(q.dtype).t()], dim=1) / self.temperature
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        if self.training:
            self.dequeue_and_enqueue(k)
        return {"q": q, "k": k, "logits": logits, "labels": labels, "queue": queue}

    def _encode_keys(self, x_k: torch.Tensor) -> torch.Tensor:
        """The key encoder on ``x_k``; with ``split_bn`` in training mode on a random
        permutation of the batch, returned in the original order."""
        if not (self.split_bn and self.training) or x_k.shape[0] < 2:
            return self.encoder_k(x_k)
        order = torch.randperm(x_k.shape[0], device=x_k.device)
        keys = self.encoder_k(x_k[order])
        return keys[torch.argsort(order)]

    @torch.no_grad()
    def embed(self, x: torch.Tensor, momentum: bool = True) -> torch.Tensor:
        """L2-normalised embeddings ``(N, dim)`` for the E-step, without gradient.

        Uses the momentum (key) encoder by default, the query encoder with
        ``momentum=False``; the encoder runs in eval mode (BatchNorm running statistics)
        and is returned to its previous mode afterwards.
        """
        encoder = self.encoder_k if momentum else self.encoder_q
        was_training = encoder.training
        encoder.eval()
        try:
            return F.normalize(encoder(x), dim=1)
        finally:
            encoder.train(was_training)
