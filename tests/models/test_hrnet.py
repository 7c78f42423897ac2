import copy
import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anchorlearn.models.encoders import Encoder, create_encoder
from anchorlearn.models.encoders.hrnet import (
    CLASSIFICATION_HEAD_PREFIXES,
    HighResolutionModule,
    HRNetEncoder,
    hrnet_w18,
    hrnet_w48,
)

HAS_TIMM = importlib.util.find_spec("timm") is not None


@pytest.fixture(scope="module")
def w18() -> HRNetEncoder:
    torch.manual_seed(0)
    return hrnet_w18()


def _calibrate_batch_norms(encoder: HRNetEncoder) -> HRNetEncoder:
    """Sets every running statistic to those of one random batch, so that eval-mode
    activations are normalised as in a trained network (with the initial statistics, 0 and 1,
    they grow to ~1e4 through the residual stages)."""
    batch_norms = [m for m in encoder.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in batch_norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: after one batch, that batch's statistics
    with torch.no_grad():
        encoder.train()(torch.randn(2, 3, 64, 64))
    for bn in batch_norms:
        bn.momentum = 0.1
    return encoder.eval()


@pytest.fixture(scope="module")
def w48() -> HRNetEncoder:
    # about 65 M parameters: built once for the whole file
    torch.manual_seed(0)
    return _calibrate_batch_norms(hrnet_w48())


# ---------------------------------------------------------------- parameter counts
def _conv(k: int, c_in: int, c_out: int, bias: bool = False) -> int:
    return k * k * c_in * c_out + (c_out if bias else 0)


def _bn(c: int) -> int:
    return 2 * c  # weight and bias


def _bottleneck(c_in: int, planes: int) -> int:
    c_out = 4 * planes
    count = _conv(1, c_in, planes) + _conv(3, planes, planes) + _conv(1, planes, c_out)
    count += _bn(planes) + _bn(planes) + _bn(c_out)
    return count + (_conv(1, c_in, c_out) + _bn(c_out) if c_in != c_out else 0)


def _hr_module(widths: list[int]) -> int:
    count = sum(4 * 2 * (_conv(3, c, c) + _bn(c)) for c in widths)  # 4 BasicBlocks a branch
    for i, c_i in enumerate(widths):
        for j, c_j in enumerate(widths):
            if j > i:  # 1x1 conv-BN, then upsampling
                count += _conv(1, c_j, c_i) + _bn(c_i)
            elif j < i:  # i - j stride-2 3x3 conv-BN, the last one changing the width
                count += (i - j - 1) * (_conv(3, c_j, c_j) + _bn(c_j))
                count += _conv(3, c_j, c_i) + _bn(c_i)
    return count


def expected_backbone_parameters(w: int, in_channels: int = 3) -> int:
    """The backbone's parameter count, derived from the architecture by hand."""
    widths = [w, 2 * w, 4 * w, 8 * w]
    stem = _conv(3, in_channels, 64) + _bn(64) + _conv(3, 64, 64) + _bn(64)
    layer1 = _bottleneck(64, 64) + 3 * _bottleneck(256, 64)
    transitions = (
        _conv(3, 256, w) + _bn(w) + _conv(3, 256, 2 * w) + _bn(2 * w)  # transition1
        + _conv(3, 2 * w, 4 * w) + _bn(4 * w)  # transition2: one new branch
        + _conv(3, 4 * w, 8 * w) + _bn(8 * w)  # transition3: one new branch
    )  # fmt: skip
    stages = _hr_module(widths[:2]) + 4 * _hr_module(widths[:3]) + 3 * _hr_module(widths)
    return stem + layer1 + transitions + stages


def classification_head_parameters(w: int) -> int:
    """The ImageNet head of HRNet-W<w>-C: a Bottleneck per branch up to 128/256/512/1024
    channels, three stride-2 3x3 conv(bias)-BN merges, a 1x1 conv(bias)-BN to 2048 and a
    2048 -> 1000 linear classifier."""
    widths = [w, 2 * w, 4 * w, 8 * w]
    incre = sum(_bottleneck(c, 32 * 2**k) for k, c in enumerate(widths))
    downsamp = sum(_conv(3, 128 * 2**k, 256 * 2**k, bias=True) + _bn(256 * 2**k) for k in range(3))
    final = _conv(1, 1024, 2048, bias=True) + _bn(2048)
    return incre + downsamp + final + 2048 * 1000 + 1000


def _num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    ("fixture", "width", "exact", "published_with_head"),
    [
        # exact: the counts of timm 1.0.31's hrnet_w18 / hrnet_w48 with features_only=True,
        # feature_location="" (the backbone alone), which also match the derivation above;
        # published: HRNet-W18-C 21.3 M and HRNet-W48-C 77.5 M parameters with the head
        ("w18", 18, 9_562_260, 21.3e6),
        ("w48", 48, 65_325_120, 77.5e6),
    ],
)
def test_parameter_count(
    fixture: str, width: int, exact: int, published_with_head: float, request
) -> None:
    encoder = request.getfixturevalue(fixture)
    assert _num_parameters(encoder) == exact == expected_backbone_parameters(width)
    with_head = exact + classification_head_parameters(width)
    assert abs(with_head - published_with_head) < 0.05e6


def test_parameter_count_with_other_in_channels() -> None:
    encoder = HRNetEncoder(18, in_channels=1)
    assert _num_parameters(encoder) == expected_backbone_parameters(18, in_channels=1)


# ---------------------------------------------------------------- shapes and contract
@pytest.mark.parametrize(("fixture", "width"), [("w18", 18), ("w48", 48)])
def test_output_shapes_channels_and_strides(fixture: str, width: int, request) -> None:
    encoder = request.getfixturevalue(fixture)
    assert encoder.out_channels == (width, 2 * width, 4 * width, 8 * width)
    assert encoder.strides == (4, 8, 16, 32)
    assert encoder.input_mean == (0.485, 0.456, 0.406)
    assert encoder.input_std == (0.229, 0.224, 0.225)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        outputs = encoder.eval()(x)
    assert isinstance(outputs, list)
    expected = [
        (1, c, 64 // s, 96 // s) for c, s in zip(encoder.out_channels, encoder.strides, strict=True)
    ]
    assert [tuple(o.shape) for o in outputs] == expected
    assert all(o.dtype == x.dtype and torch.isfinite(o).all() for o in outputs)
    assert all((o >= 0).all() for o in outputs)  # every output ends with the fuse ReLU


def test_w48_concatenated_features_have_720_channels(w48: HRNetEncoder) -> None:
    assert sum(w48.out_channels) == 720


@pytest.mark.parametrize("size", [(65, 50), (33, 97), (1, 7)])
@pytest.mark.parametrize("upsample_mode", ["bilinear", "nearest"])
def test_sizes_that_are_not_multiples_of_32(
    w18: HRNetEncoder, size: tuple[int, int], upsample_mode: str
) -> None:
    # every stride-2 conv maps s to ceil(s / 2), and the fuse layers upsample to the exact
    # size of the target branch, so any size works and branch k has ceil(H / 2**(k + 2)) rows
    encoder = copy.deepcopy(w18).eval()
    for module in encoder.modules():
        if isinstance(module, HighResolutionModule):
            module.upsample_mode = upsample_mode
    height, width = size
    with torch.no_grad():
        outputs = encoder(torch.randn(1, 3, height, width))
    assert [tuple(o.shape[-2:]) for o in outputs] == [
        (math.ceil(height / s), math.ceil(width / s)) for s in encoder.strides
    ]


def test_state_dict_key_names_and_shapes(w18: HRNetEncoder) -> None:
    # names and shapes of the ImageNet HRNet checkpoints (timm's hrnet_w18): 305 batch norms
    # with 5 entries each and 305 convolutions
    state = w18.state_dict()
    assert len(state) == 1830
    expected_shapes = {
        "conv1.weight": (64, 3, 3, 3),
        "bn2.running_var": (64,),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer1.3.conv3.weight": (256, 64, 1, 1),
        "transition1.0.0.weight": (18, 256, 3, 3),
        "transition1.1.0.0.weight": (36, 256, 3, 3),
        "transition2.2.0.0.weight": (72, 36, 3, 3),
        "transition3.3.0.1.running_mean": (144,),
        "stage2.0.branches.1.3.conv2.weight": (36, 36, 3, 3),
        "stage2.0.fuse_layers.0.1.0.weight": (18, 36, 1, 1),
        "stage2.0.fuse_layers.1.0.0.0.weight": (36, 18, 3, 3),
        "stage3.3.fuse_layers.2.0.0.0.weight": (18, 18, 3, 3),
        "stage3.3.fuse_layers.2.0.1.0.weight": (72, 18, 3, 3),
        "stage4.2.fuse_layers.0.3.0.weight": (18, 144, 1, 1),
        "stage4.2.fuse_layers.3.0.2.1.bias": (144,),
        "stage4.2.branches.3.3.bn2.num_batches_tracked": (),
    }
    assert {k: tuple(state[k].shape) for k in expected_shapes} == expected_shapes
    # unchanged widths pass through transitions 2 and 3 without parameters
    assert not any(
        k.startswith(("transition2.0.", "transition2.1.", "transition3.2.")) for k in state
    )
    assert not any(k.startswith(CLASSIFICATION_HEAD_PREFIXES) for k in state)
    assert len(w18.stage2) == 1 and len(w18.stage3) == 4 and len(w18.stage4) == 3


# ---------------------------------------------------------------- fusion
@pytest.mark.parametrize("upsample_mode", ["bilinear", "nearest"])
def test_fusion_matches_a_direct_computation(upsample_mode: str) -> None:
    module = HighResolutionModule((4, 8, 16), num_blocks=1, upsample_mode=upsample_mode).eval()
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):  # non-trivial statistics
            nn.init.uniform_(bn.running_mean, -0.5, 0.5)
            nn.init.uniform_(bn.running_var, 0.5, 1.5)
            nn.init.uniform_(bn.weight, 0.5, 1.5)
    xs = [torch.randn(2, 4, 12, 12), torch.randn(2, 8, 6, 6), torch.randn(2, 16, 3, 3)]
    inputs = [x.clone() for x in xs]
    with torch.no_grad():
        outputs = module(xs)
        ys = [branch(x) for branch, x in zip(module.branches, xs, strict=True)]
        f = module.fuse_layers

        def up(t: torch.Tensor, factor: int) -> torch.Tensor:
            return F.interpolate(t, scale_factor=factor, mode=upsample_mode)

        # the stride-2 chain 0 -> 2 has a ReLU between its two conv-BN layers
        down_0_2 = f[2][0][1](torch.relu(f[2][0][0][1](f[2][0][0][0](ys[0]))))
        expected = [
            torch.relu(ys[0] + up(f[0][1](ys[1]), 2) + up(f[0][2](ys[2]), 4)),
            torch.relu(f[1][0](ys[0]) + ys[1] + up(f[1][2](ys[2]), 2)),
            torch.relu(down_0_2 + f[2][1](ys[1]) + ys[2]),
        ]
    assert isinstance(f[0][0], nn.Identity)
    for output, reference in zip(outputs, expected, strict=True):
        torch.testing.assert_close(output, reference, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(x, x0) for x, x0 in zip(xs, inputs, strict=True))  # inputs untouched


def test_upsample_mode_changes_the_result(w18: HRNetEncoder) -> None:
    nearest = copy.deepcopy(w18).eval()
    for module in nearest.modules():
        if isinstance(module, HighResolutionModule):
            module.upsample_mode = "nearest"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = w18.eval()(x), nearest(x)
    assert w18.upsample_mode == "bilinear"
    assert not torch.allclose(a[0], b[0])


# ---------------------------------------------------------------- training behaviour
def test_gradients_reach_every_parameter(w18: HRNetEncoder) -> None:
    encoder = copy.deepcopy(w18).train()
    x = torch.randn(2, 3, 64, 64)
    x_before = x.clone()
    outputs = encoder(x)
    loss = sum((o * torch.randn_like(o)).sum() for o in outputs)
    loss.backward()
    missing = [
        name
        for name, p in encoder.named_parameters()
        if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.abs().sum() > 0
    ]
    assert missing == []
    assert torch.equal(x, x_before)


def test_gradient_checkpointing_gives_the_same_outputs_and_gradients(w18: HRNetEncoder) -> None:
    plain = copy.deepcopy(w18).train()
    checkpointed = hrnet_w18(gradient_checkpointing=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    weights = None
    grads = []
    for encoder in (plain, checkpointed):
        outputs = encoder(x)
        weights = weights or [torch.randn_like(o) for o in outputs]
        sum((o * w).sum() for o, w in zip(outputs, weights, strict=True)).backward()
        grads.append([p.grad for p in encoder.parameters()])
    for g_plain, g_checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(g_checkpointed, g_plain, rtol=1e-4, atol=1e-5)
    checkpointed.set_gradient_checkpointing(False)
    assert checkpointed.gradient_checkpointing is False


def test_eval_mode_is_deterministic_and_batch_independent(w48: HRNetEncoder) -> None:
    x = torch.randn(2, 3, 64, 64)
    buffers = {k: v.clone() for k, v in w48.state_dict().items()}
    with torch.no_grad():
        first, second = w48(x), w48(x)
        single = w48(x[1:])
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    for batched, alone in zip(first, single, strict=True):
        assert 0.1 < alone.abs().max() < 100  # normalised activations
        # float32 convolutions of another batch size sum in another order: after ~300 layers
        # that leaves ~1e-4 differences; batch statistics would change the values by ~1
        torch.testing.assert_close(batched[1:], alone, rtol=1e-3, atol=5e-3)
    after = w48.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in buffers.items())


# ---------------------------------------------------------------- bad input
def test_bad_inputs_are_rejected(w18: HRNetEncoder) -> None:
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3, H, W\), got \(2, 1, 8, 8\)"):
        w18(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"x must have shape .* got \(3, 8, 8\)"):
        w18(torch.randn(3, 8, 8))
    with pytest.raises(
        TypeError, match=r"x must be a floating-point tensor, got dtype torch\.int64"
    ):
        w18(torch.zeros(1, 3, 8, 8, dtype=torch.long))
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor, got list"):
        w18([torch.zeros(1, 3, 8, 8)])


def test_bad_constructor_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="width must be >= 1, got 0"):
        HRNetEncoder(0)
    with pytest.raises(TypeError, match="in_channels must be an int, got float"):
        hrnet_w18(in_channels=3.0)
    with pytest.raises(
        ValueError, match=r"upsample_mode must be one of .*'bilinear'.* got 'cubic'"
    ):
        hrnet_w18(upsample_mode="cubic")
    with pytest.raises(TypeError, match="gradient_checkpointing must be a bool, got str"):
        hrnet_w18(gradient_checkpointing="yes")
    with pytest.raises(ValueError, match=r"widths must name at least 2 branches, got \(18,\)"):
        HighResolutionModule((18,), num_blocks=1, upsample_mode="nearest")
    with pytest.raises(TypeError, match="pretrained must be None, 'imagenet' or the path"):
        hrnet_w18(pretrained=1)


def test_registered_encoders() -> None:
    encoder = create_encoder("hrnet_w18", upsample_mode="nearest", gradient_checkpointing=True)
    assert isinstance(encoder, HRNetEncoder) and isinstance(encoder, Encoder)
    assert encoder.out_channels == (18, 36, 72, 144) and encoder.gradient_checkpointing
    assert all(
        m.upsample_mode == "nearest"
        for m in encoder.modules()
        if isinstance(m, HighResolutionModule)
    )


def test_other_in_channels() -> None:
    encoder = hrnet_w18(in_channels=1).eval()
    assert encoder.in_channels == 1 and encoder.conv1.weight.shape == (64, 1, 3, 3)
    assert encoder.input_mean == pytest.approx((0.449,)) and len(encoder.input_std) == 1
    assert HRNetEncoder.input_mean == (0.485, 0.456, 0.406)  # the class keeps the RGB values
    with torch.no_grad():
        outputs = encoder(torch.randn(1, 1, 32, 32))
    assert [o.shape[1] for o in outputs] == [18, 36, 72, 144]


# ---------------------------------------------------------------- pretrained weights
def _perturbed_state_dict(encoder: HRNetEncoder) -> dict[str, torch.Tensor]:
    """The encoder's state dict with every floating-point entry replaced by random values."""
    return {
        k: torch.rand_like(v) + 0.5 if v.is_floating_point() else v.clone()
        for k, v in encoder.state_dict().items()
    }


def _head_keys() -> dict[str, torch.Tensor]:
    # a few keys of the ImageNet classification head, with their shapes in HRNet-W18-C
    return {
        "incre_modules.0.0.conv1.weight": torch.zeros(32, 18, 1, 1),
        "downsamp_modules.2.0.bias": torch.zeros(1024),
        "final_layer.1.running_var": torch.ones(2048),
        "classifier.weight": torch.zeros(1000, 2048),
    }


def test_loads_a_saved_file_and_ignores_the_classification_head(
    w18: HRNetEncoder, tmp_path: Path
) -> None:
    weights = _perturbed_state_dict(w18)
    path = tmp_path / "hrnet_w18_imagenet.pth"
    torch.save({**weights, **_head_keys()}, path)
    encoder = hrnet_w18(pretrained=str(path))
    loaded = encoder.state_dict()
    assert loaded.keys() == weights.keys()
    assert all(torch.equal(loaded[k], v) for k, v in weights.items())


def test_loads_the_backbone_of_a_segmentation_checkpoint(w18: HRNetEncoder, tmp_path: Path) -> None:
    weights = _perturbed_state_dict(w18)
    path = tmp_path / "segmentor.pth"
    checkpoint = {f"backbone.{k}": v for k, v in weights.items()}
    checkpoint["decode_head.conv_seg.weight"] = torch.zeros(19, 720, 1, 1)
    torch.save({"state_dict": checkpoint, "meta": {"epoch": 3}}, path)
    encoder = hrnet_w18(pretrained=path)
    assert torch.equal(encoder.stage4[2].fuse_layers[3][0][2][0].weight,
                       weights["stage4.2.fuse_layers.3.0.2.0.weight"])  # fmt: skip


def test_rgb_weights_into_a_one_channel_encoder(w18: HRNetEncoder, tmp_path: Path) -> None:
    weights = _perturbed_state_dict(w18)
    path = tmp_path / "rgb.pth"
    torch.save(weights, path)
    encoder = hrnet_w18(in_channels=1, pretrained=path)
    expected = weights["conv1.weight"].sum(dim=1, keepdim=True)
    torch.testing.assert_close(encoder.conv1.weight.detach(), expected)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda sd: sd.update(
                {"stage3.0.fuse_layers.2.0.0.0.weight": torch.zeros(18, 18, 1, 1)}
            ),
            r"1 shape mismatch.*stage3\.0\.fuse_layers\.2\.0\.0\.0\.weight: file \(18, 18, 1, 1\), "
            r"module \(18, 18, 3, 3\)",
        ),
        (lambda sd: sd.pop("transition3.3.0.0.weight"), r"1 missing key.*transition3\.3\.0\.0"),
        (
            lambda sd: sd.update({"stage5.0.weight": torch.zeros(1)}),
            r"1 unexpected key.*stage5\.0\.weight",
        ),
    ],
    ids=["shape", "missing", "unexpected"],
)
def test_mismatching_files_are_rejected(
    w18: HRNetEncoder, tmp_path: Path, change, message: str
) -> None:
    weights = {**_perturbed_state_dict(w18), **_head_keys()}
    change(weights)
    path = tmp_path / "bad.pth"
    torch.save(weights, path)
    with pytest.raises(ValueError, match=r"state_dict does not fit HRNetEncoder: " + message):
        hrnet_w18(pretrained=path)


def test_w48_weights_do_not_fit_w18(w48: HRNetEncoder, tmp_path: Path) -> None:
    path = tmp_path / "w48.pth"
    torch.save({k: v for k, v in w48.state_dict().items() if k.startswith("transition1.")}, path)
    with pytest.raises(ValueError, match=r"does not fit HRNetEncoder.*transition1\.0\.0\.weight: "
                       r"file \(48, 256, 3, 3\), module \(18, 256, 3, 3\)"):  # fmt: skip
        hrnet_w18(pretrained=path)


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="existing weights file"):
        hrnet_w18(pretrained=tmp_path / "absent.pth")


@pytest.mark.skipif(HAS_TIMM, reason="checks the message shown without timm")
def test_imagenet_without_timm_asks_for_a_local_file() -> None:
    with pytest.raises(ValueError, match=r"hrnet_w18.*pass the path of a local weights file"):
        hrnet_w18(pretrained="imagenet")


# ---------------------------------------------------------------- timm reference
@pytest.mark.skipif(not HAS_TIMM, reason="timm is not installed")
def test_matches_timm_features_with_the_same_weights() -> None:
    # timm's HRNet (the ImageNet classification code) upsamples with nearest neighbours: with
    # upsample_mode="nearest" and timm's random weights (and random running statistics) the
    # four branch outputs must agree, which checks names, fuse order and upsampling
    import timm

    reference = timm.create_model(
        "hrnet_w18", features_only=True, feature_location="", out_indices=(1, 2, 3, 4)
    ).eval()
    for bn in reference.modules():
        if isinstance(bn, nn.BatchNorm2d):
            nn.init.uniform_(bn.running_mean, -0.2, 0.2)
            nn.init.uniform_(bn.running_var, 0.5, 1.5)
            nn.init.uniform_(bn.weight, 0.5, 1.5)
            nn.init.uniform_(bn.bias, -0.2, 0.2)
    weights = reference.state_dict()
    encoder = hrnet_w18(upsample_mode="nearest").eval()
    assert list(encoder.state_dict()) == list(weights)
    encoder.load_state_dict(weights)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected, got = reference(x), encoder(x)
    assert len(expected) == len(got) == 4
    for a, b in zip(expected, got, strict=True):
        assert torch.isfinite(a).all() and a.abs().max() > 0.1
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
