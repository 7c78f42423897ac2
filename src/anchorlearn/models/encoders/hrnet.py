"""HRNet-V2 backbones (Wang et al., "Deep High-Resolution Representation Learning for Visual
Recognition", TPAMI 2020) as segmentation encoders.

The network keeps a high-resolution branch from the stem to the end and adds a branch of half
the resolution and twice the width at each stage, exchanging information between all branches
after every module:

* stem: two 3x3 stride-2 conv-BN-ReLU layers (64 channels, stride 4);
* stage 1 (``layer1``): four Bottleneck blocks, 64 -> 256 channels;
* ``transition1`` and stages 2, 3, 4 with 1, 4 and 3 high-resolution modules; every module
  runs four BasicBlocks on each of its branches (widths ``w, 2w, 4w, 8w``) and then fuses
  them: output ``i`` is ``ReLU(sum_j f_ij(x_j))`` with ``f_ii`` the identity, ``f_ij`` for
  ``j > i`` a 1x1 conv-BN followed by upsampling to branch ``i``'s size, and ``f_ij`` for
  ``j < i`` a chain of ``i - j`` stride-2 3x3 conv-BN layers (ReLU between them);
* ``transition2`` / ``transition3`` add one branch each, a stride-2 3x3 conv-BN-ReLU of the
  lowest-resolution branch.

:meth:`HRNetEncoder.forward` returns the four branch outputs of the last stage, highest
resolution first: ``(B, w, H/4, W/4)``, ``(B, 2w, H/8, W/8)``, ``(B, 4w, H/16, W/16)`` and
``(B, 8w, H/32, W/32)``. An FCN head upsamples and concatenates them into ``D = 15w``
channels (720 for HRNet-W48, 270 for HRNet-W18).

Any input size is accepted: each stride-2 convolution maps a size ``s`` to ``ceil(s / 2)``,
so branch ``k`` has ``ceil(H / 2**(k + 2))`` rows, and the fuse layers upsample to the exact
size of the target branch (for sizes that are multiples of 32 this is the same as upsampling
by ``2**(j - i)``).

State-dict keys and shapes are those of the ImageNet HRNet checkpoints as timm names them
(``hrnet_w18`` / ``hrnet_w48``: ``conv1``, ``bn1``, ``conv2``, ``bn2``, ``layer1``,
``transition1``, ``stage2.0.branches.0.0.conv1``, ``stage2.0.fuse_layers.0.1.0``, ...), so
those checkpoints load directly; their classification head (``incre_modules``,
``downsamp_modules``, ``final_layer``, ``classifier``) is not part of the encoder and is
ignored when loading.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from anchorlearn._checks import check_positive_int
from anchorlearn.models.encoders import IMAGENET_MEAN, IMAGENET_STD, Encoder, channel_statistics
from anchorlearn.models.pretrained import load_pretrained

__all__ = [
    "CLASSIFICATION_HEAD_PREFIXES",
    "HRNetEncoder",
    "HighResolutionModule",
    "hrnet_w18",
    "hrnet_w48",
]

#: Key prefixes of the ImageNet classification head, which the encoder does not have.
CLASSIFICATION_HEAD_PREFIXES = (
    "incre_modules.",
    "downsamp_modules.",
    "final_layer.",
    "classifier.",
)

#: Normalisation of RGB inputs in ``[0, 1]`` that the ImageNet weights expect.

_UPSAMPLE_MODES = ("bilinear", "nearest")
_STEM_WIDTH = 64
_LAYER1_PLANES = 64
_LAYER1_BLOCKS = 4
_BLOCKS_PER_BRANCH = 4
_MODULES_PER_STAGE = (1, 4, 3)  # stages 2, 3, 4


def _conv_bn(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, relu: bool = True
) -> nn.Sequential:
    """``Conv2d`` (no bias, "same" padding) followed by ``BatchNorm2d`` and optionally ReLU;
    the parameters are keys ``0.*`` and ``1.*``."""
    layers: list[nn.Module] = [
        nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False
        ),
        nn.BatchNorm2d(out_channels),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """Residual block ``ReLU(x + BN(conv3x3(ReLU(BN(conv3x3(x))))))`` at constant resolution.

    ``forward`` maps ``(B, in_channels, H, W)`` to ``(B, channels, H, W)``; a 1x1 conv-BN
    ``downsample`` projects the shortcut when the channel counts differ.
    """

    expansion = 1

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            _conv_bn(in_channels, channels, 1, relu=False) if in_channels != channels else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class Bottleneck(nn.Module):
    """Residual block 1x1 (``planes``) -> 3x3 (``planes``) -> 1x1 (``4 * planes``), each
    conv followed by BN, ReLU after the first two and after the residual sum.

    ``forward`` maps ``(B, in_channels, H, W)`` to ``(B, 4 * planes, H, W)``.
    """

    expansion = 4

    def __init__(self, in_channels: int, planes: int) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            _conv_bn(in_channels, out_channels, 1, relu=False)
            if in_channels != out_channels
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class HighResolutionModule(nn.Module):
    """Parallel branches of BasicBlocks followed by the multi-resolution fusion.

    Args:
        widths: channels of each branch (at least two), highest resolution first (branch
            ``k`` has half the resolution of branch ``k - 1``).
        num_blocks: BasicBlocks per branch.
        upsample_mode: ``"bilinear"`` (``align_corners=False``, as segmentation code does) or
            ``"nearest"`` (as the ImageNet classification code does).

    ``fuse_layers[i][j]`` brings branch ``j`` to branch ``i``: ``nn.Identity`` for ``i == j``,
    a 1x1 conv-BN for ``j > i`` (the upsampling is done in ``forward``), a chain of ``i - j``
    stride-2 3x3 conv-BN layers (ReLU between them) for ``j < i``.
    ``forward`` takes and returns a list of ``(B, widths[k], H_k, W_k)`` tensors.
    """

    def __init__(
        self,
        widths: tuple[int, ...],
        num_blocks: int,
        upsample_mode: Literal["bilinear", "nearest"],
    ) -> None:
        super().__init__()
        if len(widths) < 2:
            raise ValueError(f"widths must name at least 2 branches, got {tuple(widths)}")
        self.widths = tuple(widths)
        self.upsample_mode = upsample_mode
        self.branches = nn.ModuleList(
            nn.Sequential(*(BasicBlock(width, width) for _ in range(num_blocks)))
            for width in self.widths
        )
        self.fuse_layers = nn.ModuleList(
            nn.ModuleList(self._fuse_layer(i, j) for j in range(len(self.widths)))
            for i in range(len(self.widths))
        )
        self.relu = nn.ReLU(inplace=True)

    def _fuse_layer(self, i: int, j: int) -> nn.Module:
        if i == j:
            return nn.Identity()
        if j > i:
            return _conv_bn(self.widths[j], self.widths[i], 1, relu=False)
        steps = [_conv_bn(self.widths[j], self.widths[j], 3, stride=2) for _ in range(i - j - 1)]
        steps.append(_conv_bn(self.widths[j], self.widths[i], 3, stride=2, relu=False))
        return nn.Sequential(*steps)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        xs = [branch(x) for branch, x in zip(self.branches, xs, strict=True)]
        outputs = []
        for i, fuse_row in enumerate(self.fuse_layers):
            total: torch.Tensor | None = None
            for j, fuse in enumerate(fuse_row):
                if j == i:
                    term = xs[i]
                else:
                    term = fuse(xs[j])
                    if j > i:
                        term = F.interpolate(term, size=xs[i].shape[-2:], mode=self.upsample_mode)
                if total is None:
                    total = term
                elif total is xs[i]:  # never write into a branch output: the other rows read it
                    total = total + term
                else:  # a fresh sum: accumulate in place (an add saves nothing for backward)
                    total += term
            assert total is not None
            outputs.append(self.relu(total))
        return outputs


class HRNetEncoder(Encoder):
    """HRNet-V2 backbone returning the four branch outputs of its last stage.

    Args:
        width: the width ``w`` of the highest-resolution branch (18 for HRNet-W18, 48 for
            HRNet-W48); the branches have ``w, 2w, 4w, 8w`` channels.
        in_channels: image channels.
        upsample_mode: how the fuse layers upsample lower-resolution branches:
            ``"bilinear"`` (default, ``align_corners=False``, as mmsegmentation's HRNet) or
            ``"nearest"`` (as the ImageNet HRNet classification code and timm).
        gradient_checkpointing: recompute ``layer1`` and every high-resolution module in the
            backward pass instead of storing their activations (training with gradients only).
            It saves memory at the cost of a second forward pass through those parts; the
            batch-norm running statistics are then updated twice per step.

    ``forward(x)`` with ``x`` ``(B, in_channels, H, W)`` returns ``[(B, w, ceil(H/4),
    ceil(W/4)), (B, 2w, ceil(H/8), ceil(W/8)), (B, 4w, ceil(H/16), ceil(W/16)),
    (B, 8w, ceil(H/32), ceil(W/32))]``. Inputs should be normalised with
    :attr:`input_mean` / :attr:`input_std` (ImageNet statistics of RGB in ``[0, 1]``).
    """

    strides: tuple[int, ...] = (4, 8, 16, 32)
    input_mean: tuple[float, ...] = IMAGENET_MEAN
    input_std: tuple[float, ...] = IMAGENET_STD

    def __init__(
        self,
        width: int,
        *,
        in_channels: int = 3,
        upsample_mode: Literal["bilinear", "nearest"] = "bilinear",
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.width = check_positive_int(width, "width")
        self.in_channels = check_positive_int(in_channels, "in_channels")
        if upsample_mode not in _UPSAMPLE_MODES:
            raise ValueError(
                f"upsample_mode must be one of {_UPSAMPLE_MODES}, got {upsample_mode!r}"
            )
        self.upsample_mode = upsample_mode
        self.set_gradient_checkpointing(gradient_checkpointing)
        self.out_channels: tuple[int, ...] = tuple(width * 2**k for k in range(4))
        if in_channels != 3:  # one averaged value per channel
            self.input_mean = channel_statistics(IMAGENET_MEAN, in_channels)
            self.input_std = channel_statistics(IMAGENET_STD, in_channels)

        self.conv1 = nn.Conv2d(in_channels, _STEM_WIDTH, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(_STEM_WIDTH)
        self.conv2 = nn.Conv2d(_STEM_WIDTH, _STEM_WIDTH, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(_STEM_WIDTH)
        self.relu = nn.ReLU(inplace=True)
        layer1_in = _STEM_WIDTH
        blocks = []
        for _ in range(_LAYER1_BLOCKS):
            blocks.append(Bottleneck(layer1_in, _LAYER1_PLANES))
            layer1_in = _LAYER1_PLANES * Bottleneck.expansion
        self.layer1 = nn.Sequential(*blocks)

        previous = (layer1_in,)
        for stage, num_modules in enumerate(_MODULES_PER_STAGE, start=2):
            widths = self.out_channels[:stage]
            self.add_module(f"transition{stage - 1}", self._transition(previous, widths))
            self.add_module(
                f"stage{stage}",
                nn.Sequential(
                    *(
                        HighResolutionModule(widths, _BLOCKS_PER_BRANCH, upsample_mode)
                        for _ in range(num_modules)
                    )
                ),
            )
            previous = widths
        self._init_weights()

    @staticmethod
    def _transition(previous: tuple[int, ...], widths: tuple[int, ...]) -> nn.ModuleList:
        """Maps the previous stage's branches onto ``widths``: a 3x3 conv-BN-ReLU where the
        width changes (identity otherwise), and one new branch made from the last previous
        branch by a stride-2 3x3 conv-BN-ReLU (keys ``transitionN.<k>.0.*``)."""
        layers: list[nn.Module] = [
            _conv_bn(c_in, c_out, 3) if c_in != c_out else nn.Identity()
            for c_in, c_out in zip(previous, widths[: len(previous)], strict=True)
        ]
        layers.append(nn.Sequential(_conv_bn(previous[-1], widths[len(previous)], 3, stride=2)))
        return nn.ModuleList(layers)

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def set_gradient_checkpointing(self, enable: bool = True) -> None:
        """Turn the recomputation of ``layer1`` and the high-resolution modules on or off."""
        if not isinstance(enable, bool):
            raise TypeError(f"gradient_checkpointing must be a bool, got {type(enable).__name__}")
        self.gradient_checkpointing = enable

    def _run(self, module: nn.Module, x: Any) -> Any:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, x, use_reentrant=False)
        return module(x)

    def _stage(self, stage: nn.Sequential, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        for module in stage:
            xs = self._run(module, xs)
        return xs

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Four feature maps ``(B, 2**k * w, ceil(H / 2**(k+2)), ceil(W / 2**(k+2)))``,
        ``k = 0..3``, of images ``x`` ``(B, in_channels, H, W)``."""
        x = self.relu(self.bn1(self.conv1(self.check_input(x))))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self._run(self.layer1, x)
        xs = [layer(x) for layer in self.transition1]
        for transition, stage in (
            (self.transition2, self.stage2),
            (self.transition3, self.stage3),
            (None, self.stage4),
        ):
            xs = self._stage(stage, xs)
            if transition is not None:
                *keep, new = transition
                xs = [layer(y) for layer, y in zip(keep, xs, strict=True)] + [new(xs[-1])]
        return xs


def _imagenet_weights(timm_name: str) -> Callable[[], dict[str, torch.Tensor]] | None:
    """A function returning timm's ImageNet weights of ``timm_name`` (downloaded into timm's
    cache on first use), or ``None`` where timm is not installed."""
    if importlib.util.find_spec("timm") is None:
        return None

    def state_dict() -> dict[str, torch.Tensor]:
        from anchorlearn.models.encoders.timm_encoder import import_timm

        return import_timm().create_model(timm_name, pretrained=True).state_dict()

    return state_dict


def _build(
    width: int, in_channels: int, pretrained: str | os.PathLike[str] | None, **kwargs: Any
) -> HRNetEncoder:
    encoder = HRNetEncoder(width, in_channels=in_channels, **kwargs)
    name = f"hrnet_w{width}"
    load_pretrained(
        encoder,
        pretrained,
        name=name,
        imagenet=_imagenet_weights(name),
        ignore=CLASSIFICATION_HEAD_PREFIXES,
        input_conv="conv1.weight",
    )
    return encoder


def hrnet_w18(
    *, in_channels: int = 3, pretrained: str | os.PathLike[str] | None = None, **kwargs: Any
) -> HRNetEncoder:
    """HRNet-W18: branches of 18, 36, 72 and 144 channels; 9.56 M parameters.

    ``pretrained``: ``None`` (random initialisation), ``"imagenet"`` (timm's ``hrnet_w18``
    weights; needs timm, otherwise a ``ValueError`` asks for a local file) or the path of a
    weights file with these key names: an ImageNet HRNet checkpoint (its classification head
    is ignored), the ``state_dict`` of an :class:`HRNetEncoder` or of a network holding one
    under ``backbone.`` / ``encoder.``. Any other missing, unexpected or mis-shaped key is a
    ``ValueError``. With ``in_channels != 3`` the RGB stem filters are averaged.
    ``kwargs``: ``upsample_mode`` and ``gradient_checkpointing`` of :class:`HRNetEncoder`.
    """
    return _build(18, in_channels, pretrained, **kwargs)


def hrnet_w48(
    *, in_channels: int = 3, pretrained: str | os.PathLike[str] | None = None, **kwargs: Any
) -> HRNetEncoder:
    """HRNet-W48: branches of 48, 96, 192 and 384 channels (720 together); 65.3 M parameters.

    ``pretrained``: ``None`` (random initialisation), ``"imagenet"`` (timm's ``hrnet_w48``
    weights; needs timm, otherwise a ``ValueError`` asks for a local file) or the path of a
    weights file with these key names: an ImageNet HRNet checkpoint (its classification head
    is ignored), the ``state_dict`` of an :class:`HRNetEncoder` or of a network holding one
    under ``backbone.`` / ``encoder.``. Any other missing, unexpected or mis-shaped key is a
    ``ValueError``. With ``in_channels != 3`` the RGB stem filters are averaged.
    ``kwargs``: ``upsample_mode`` and ``gradient_checkpointing`` of :class:`HRNetEncoder`.
    """
    return _build(48, in_channels, pretrained, **kwargs)
