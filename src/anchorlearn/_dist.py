"""What the library asks of ``torch.distributed``, in one place.

Imported only by modules that already import torch (the losses, models and cluster code that
synchronise state across ranks), so that ``import anchorlearn`` stays free of torch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_gather_cat", "is_distributed"]


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised with more than one rank
    (``False`` when torch is built without distributed support)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` ``(n, ...)``, concatenated in rank order: ``(world * n, ...)``.

    Every rank must call it with a tensor of the same shape; a collective call of the
    initialised process group (see :func:`is_distributed`).
    """
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered)
