"""Layers shared by the models."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FeatureBatchNorm"]


class FeatureBatchNorm(nn.BatchNorm1d):
    """``BatchNorm1d`` over ``(N, D)`` features that also accepts a training batch of one.

    A training batch with a single row (the last, short batch of an epoch) has no batch
    statistics; it is normalised with the running statistics instead (as in eval mode), and
    the running statistics are left unchanged. Every other batch is ordinary batch norm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.ndim == 2 and x.shape[0] == 1 and self.track_running_stats:
            return F.batch_norm(
                x,
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                training=False,
                eps=self.eps,
            )
        return super().forward(x)
