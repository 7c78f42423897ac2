"""BatchNorm that normalises groups of a batch separately (MoCo's single-device Shuffle-BN).

In training mode :class:`SplitBatchNorm2d` splits the batch into ``num_splits`` consecutive
chunks and normalises each with its own mean and variance, so that a sample's output does
not depend on the samples of the other chunks. Together with a random permutation of the
key batch (:class:`~anchorlearn.models.moco.MoCo` with ``split_bn``), the key of a sample
is normalised with a different group of samples than its query, which removes the
batch-statistics shortcut of the contrastive task on one device, as Shuffle-BN does across
devices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SplitBatchNorm2d", "split_batchnorm"]


def _check_num_splits(num_splits: object) -> int:
    if isinstance(num_splits, bool) or not isinstance(num_splits, int):
        raise TypeError(f"num_splits must be an int, got {type(num_splits).__name__}")
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    return num_splits


class SplitBatchNorm2d(nn.BatchNorm2d):
    r"""``nn.BatchNorm2d`` whose training-mode statistics are per chunk of the batch.

    Training mode: the batch ``(N, C, H, W)`` is cut into ``min(num_splits, N)`` consecutive
    chunks (``torch.tensor_split``: equal sizes when ``num_splits`` divides ``N``, else
    sizes that differ by one, e.g. a smaller last batch of an epoch); each chunk is
    normalised with its own biased mean and variance over ``(n, H, W)``, then scaled by the
    shared ``weight`` and shifted by the shared ``bias``. Each running statistic becomes the
    mean over the chunks of the update one ``nn.BatchNorm2d`` step on that chunk would make,

    .. math:: r \leftarrow (1 - m)\,r + m\,\tfrac{1}{G}\textstyle\sum_g s_g,

    with :math:`s_g` the chunk's mean or unbiased variance and :math:`m` the momentum
    (``momentum=None``: the cumulative factor ``1 / num_batches_tracked``, counted once per
    forward). Eval mode is exactly ``nn.BatchNorm2d`` (running statistics, or without
    ``track_running_stats`` the whole batch's statistics).

    The parameters and buffers are those of ``nn.BatchNorm2d`` (same ``state_dict`` keys),
    so checkpoints load in either class.

    Args:
        num_features: channels ``C``.
        num_splits: chunks ``G >= 1`` per training batch (1: plain BatchNorm).
        eps, momentum, affine, track_running_stats, device, dtype: as ``nn.BatchNorm2d``.

    Shapes:
        input and output ``(N, C, H, W)``.
    """

    def __init__(
        self,
        num_features: int,
        num_splits: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_features,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=track_running_stats,
            device=device,
            dtype=dtype,
        )
        self.num_splits = _check_num_splits(num_splits)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or self.num_splits == 1:
            return super().forward(input)
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"input must have {self.num_features} channels, got shape {tuple(input.shape)}"
            )
        if input.shape[0] == 0:
            raise ValueError(f"input must hold at least one sample, got shape {tuple(input.shape)}")
        chunks = torch.tensor_split(input, min(self.num_splits, input.shape[0]), dim=0)
        tracking = self.track_running_stats and self.running_mean is not None
        factor = 0.0
        if tracking:
            assert self.num_batches_tracked is not None
            self.num_batches_tracked.add_(1)
            factor = (
                1.0 / float(self.num_batches_tracked)
                if self.momentum is None
                else float(self.momentum)
            )
        outputs, means, variances = [], [], []
        for chunk in chunks:
            running_mean = self.running_mean.clone() if tracking else None
            running_var = self.running_var.clone() if tracking else None
            outputs.append(
                F.batch_norm(
                    chunk,
                    running_mean,
                    running_var,
                    self.weight,
                    self.bias,
                    True,
                    factor,
                    self.eps,
                )
            )
            if tracking:
                means.append(running_mean)
                variances.append(running_var)
        if tracking:
            with torch.no_grad():
                self.running_mean.copy_(torch.stack(means).mean(dim=0))
                self.running_var.copy_(torch.stack(variances).mean(dim=0))
        return torch.cat(outputs, dim=0)


def split_batchnorm(module: nn.Module, num_splits: int) -> int:
    """Replace, in place, every ``nn.BatchNorm2d`` inside ``module`` by a
    :class:`SplitBatchNorm2d` with ``num_splits`` chunks, carrying over its settings,
    parameters (and their ``requires_grad``), running statistics and batch counter, and its
    train/eval mode. Layers that already are :class:`SplitBatchNorm2d` get ``num_splits``.

    ``module`` must not itself be a BatchNorm layer (it is changed in place through its
    parent). Returns the number of layers converted or updated (0: none found).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    num_splits = _check_num_splits(num_splits)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        raise ValueError(
            f"module must contain BatchNorm layers, got a {type(module).__name__} itself: "
            "convert its parent module"
        )
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SplitBatchNorm2d):
                child.num_splits = num_splits
                count += 1
            elif type(child) is nn.BatchNorm2d:
                setattr(parent, name, _convert(child, num_splits))
                count += 1
    return count


def _convert(bn: nn.BatchNorm2d, num_splits: int) -> SplitBatchNorm2d:
    reference = bn.weight if bn.weight is not None else bn.running_mean
    split = SplitBatchNorm2d(
        bn.num_features,
        num_splits,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        device=None if reference is None else reference.device,
        dtype=None if reference is None else reference.dtype,
    )
    split.load_state_dict(bn.state_dict())
    if bn.affine:
        split.weight.requires_grad_(bn.weight.requires_grad)
        split.bias.requires_grad_(bn.bias.requires_grad)
    split.train(bn.training)
    return split
