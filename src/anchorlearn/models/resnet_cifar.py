"""CIFAR-style ResNets (He et al., "Deep Residual Learning for Image Recognition", 2016, §4.2).

A 3x3 stem with 16 channels, then three stages of ``n`` basic blocks with 16, 32 and 64
channels (stride 1, 2, 2), global average pooling and a linear classifier; depth ``6n + 2``
(ResNet-20: n = 3, about 0.27 M parameters; ResNet-32: n = 5, about 0.46 M).

Shortcuts where the shape changes follow the paper's CIFAR option A by default (parameter
free: stride-2 subsampling and zero-padding of the new channels); ``shortcut="B"`` uses a
1x1 convolution with BatchNorm instead.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from anchorlearn._checks import check_num_classes, check_positive_int
from anchorlearn.models._layers import FeatureBatchNorm
from anchorlearn.models.registry import register_model

__all__ = ["BasicBlock", "CifarResNet", "CosineClassifier", "resnet20", "resnet32"]

ShortcutKind = Literal["A", "B"]


class _PadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad the channel dimension."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        front = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, front, self.extra - front))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection: ``relu(F(x) + shortcut(x))``."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, shortcut: ShortcutKind
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = _PadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CosineClassifier(nn.Module):
    """Logits that are cosines: ``normalize(x) @ normalize(W).T``, in ``[-1, 1]``.

    The classifier of LDAM's CIFAR recipe (Cao et al. 2019), whose loss scales the
    cosines (by 30) before the cross-entropy. ``weight`` is ``(C, D)``, drawn uniformly.
    """

    # the largest |logit|: losses that classify through this layer at face value (SAR's
    # auxiliary CE) check what probability it can reach
    logit_bound = 1.0

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = check_positive_int(in_features, "in_features")
        self.out_features = check_num_classes(out_features)
        bound = 1.0 / in_features**0.5
        self.weight = nn.Parameter(torch.empty(out_features, in_features).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=1).t()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class CifarResNet(nn.Module):
    """ResNet of depth ``6 * blocks_per_stage + 2`` for small (e.g. 32x32 or 28x28) images.

    Args:
        blocks_per_stage: ``n`` basic blocks in each of the three stages.
        num_classes: number of output classes ``C``.
        in_channels: image channels (3 for CIFAR, 1 for Fashion-MNIST).
        feat_dim: if given, the pooled 64-d vector goes through Linear(64, feat_dim)-BN-ReLU
            and the features are that ``feat_dim``-d vector; by default the features are the
            global-pooled 64-d vector itself.
        shortcut: ``"A"`` (zero-padding, the paper's CIFAR choice) or ``"B"`` (1x1 conv).
        cosine_classifier: classify with a :class:`CosineClassifier` (cosine logits, for
            the LDAM recipe) instead of ``nn.Linear``.

    ``forward(x)`` with ``x`` ``(B, in_channels, H, W)`` returns ``(logits, features)`` of
    shapes ``(B, C)`` and ``(B, feat_dim)``, with ``logits == classifier(features)``.
    """

    def __init__(
        self,
        blocks_per_stage: int,
        num_classes: int = 10,
        in_channels: int = 3,
        feat_dim: int | None = None,
        shortcut: ShortcutKind = "A",
        cosine_classifier: bool = False,
    ) -> None:
        super().__init__()
        check_positive_int(blocks_per_stage, "blocks_per_stage")
        self.num_classes = check_num_classes(num_classes)
        check_positive_int(in_channels, "in_channels")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        layers: list[nn.Module] = []
        channels = 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks_per_stage):
                layers.append(BasicBlock(channels, width, stride if i == 0 else 1, shortcut))
                channels = width
        self.stages = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.projection: nn.Module
        if feat_dim is None:
            self.projection = nn.Identity()
            self.feat_dim = channels
        else:
            self.feat_dim = check_positive_int(feat_dim, "feat_dim")
            self.projection = nn.Sequential(
                nn.Linear(channels, feat_dim, bias=False), FeatureBatchNorm(feat_dim), nn.ReLU()
            )
        if not isinstance(cosine_classifier, bool):
            raise TypeError(f"cosine_classifier must be a bool, got {cosine_classifier!r}")
        self.classifier: nn.Module = (
            CosineClassifier(self.feat_dim, num_classes)
            if cosine_classifier
            else nn.Linear(self.feat_dim, num_classes)
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``(B, feat_dim)`` of images ``x`` ``(B, in_channels, H, W)``."""
        return self.projection(self.pool(self.stages(self.stem(x))))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits (B, C), features (B, feat_dim))`` of images ``(B, in_channels, H, W)``."""
        features = self.forward_features(x)
        return self.classifier(features), features


@register_model("resnet20")
def resnet20(**kwargs: object) -> CifarResNet:
    """ResNet-20 (3 blocks per stage, ~0.27 M parameters with option A)."""
    return CifarResNet(3, **kwargs)  # type: ignore[arg-type]


@register_model("resnet32")
def resnet32(**kwargs: object) -> CifarResNet:
    """ResNet-32 (5 blocks per stage, ~0.46 M parameters with option A)."""
    return CifarResNet(5, **kwargs)  # type: ignore[arg-type]
