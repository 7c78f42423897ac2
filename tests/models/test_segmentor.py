"""Decode heads (FCN, DeepLabv3+, SegFormer MLP) and the encoder-decoder network: shapes and
strides, the (logits, features) contract, independent recomputations of the heads, parameter
groups, errors, and the registered builders on the real encoders."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anchorlearn.losses import SemanticAnchorRegularizer
from anchorlearn.models import (
    DeepLabV3PlusHead,
    EncoderDecoder,
    FCNHead,
    FixedETFModel,
    MLPHead,
    create_model,
    list_models,
)


class FakeEncoder(nn.Module):
    """Strided 3x3 convs: one map per stride, of size ceil(H / s) x ceil(W / s)."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: tuple[int, ...] = (6, 8, 10, 12),
        strides: tuple[int, ...] = (4, 8, 16, 32),
    ) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.strides = strides
        self.input_mean = (0.485, 0.456, 0.406)
        self.input_std = (0.229, 0.224, 0.225)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 4, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        stages, previous, stride = [], 4, 4
        for channels, s in zip(out_channels, strides, strict=True):
            step = s // stride
            stages.append(
                nn.Sequential(nn.Conv2d(previous, channels, 3, stride=step, padding=1), nn.ReLU())
            )
            previous, stride = channels, s
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps, y = [], self.stem(x)
        for stage in self.stages:
            y = stage(y)
            maps.append(y)
        return maps


HEADS = {
    "fcn": lambda ch, st, c, **kw: FCNHead(ch, st, c, **kw),
    "deeplab": lambda ch, st, c, **kw: DeepLabV3PlusHead(ch, st, c, channels=16, **kw),
    "deeplab_separable": lambda ch, st, c, **kw: DeepLabV3PlusHead(
        ch, st, c, channels=16, separable=True, **kw
    ),
    "mlp": lambda ch, st, c, **kw: MLPHead(ch, st, c, channels=16, **kw),
}
ENCODERS = {
    "strides_4_32": ((6, 8, 10, 12), (4, 8, 16, 32)),
    "strides_4_8": ((6, 8, 10, 12), (4, 8, 8, 8)),
}


def make_model(head: str, encoder: str = "strides_4_32", num_classes: int = 5) -> EncoderDecoder:
    channels, strides = ENCODERS[encoder]
    enc = FakeEncoder(3, channels, strides)
    return EncoderDecoder(enc, HEADS[head](channels, strides, num_classes))


def maps_for(channels, sizes, batch=2) -> list[torch.Tensor]:
    return [torch.randn(batch, c, h, w) for c, (h, w) in zip(channels, sizes, strict=True)]


@pytest.mark.parametrize("encoder", sorted(ENCODERS))
@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize(("batch", "size"), [(2, (64, 64)), (2, (50, 70)), (1, (33, 47))])
def test_shapes_and_strides_in_training(head, encoder, batch, size) -> None:
    model = make_model(head, encoder).train()
    assert model.output_stride == 4
    x = torch.randn(batch, 3, *size)
    logits, features = model(x)
    expected = (math.ceil(size[0] / 4), math.ceil(size[1] / 4))
    assert logits.shape == (batch, 5, *expected)
    assert features.shape == (batch, model.feat_dim, *expected)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("head", sorted(HEADS))
def test_eval_logits_are_the_classifier_of_the_features(head) -> None:
    model = make_model(head).eval()
    x = torch.randn(2, 3, 40, 72)
    with torch.no_grad():
        logits, features = model(x)
        torch.testing.assert_close(model.classifier(features), logits)
        torch.testing.assert_close(model.forward_features(x), features)
    assert model.classifier is model.head.classifier
    assert isinstance(model.classifier, nn.Conv2d) and model.classifier.kernel_size == (1, 1)
    assert model.classifier.in_channels == model.feat_dim
    assert model.classifier.out_channels == model.num_classes == 5


@pytest.mark.parametrize("head", sorted(HEADS))
def test_gradients_reach_every_parameter(head) -> None:
    model = make_model(head).train()
    logits, _ = model(torch.randn(2, 3, 64, 64))
    (logits * torch.randn_like(logits)).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("head", sorted(HEADS))
def test_param_groups_partition_the_parameters(head) -> None:
    model = make_model(head)
    groups = model.param_groups()
    assert set(groups) == {"backbone", "head"}
    backbone = [id(p) for p in groups["backbone"]]
    rest = [id(p) for p in groups["head"]]
    assert len(set(backbone)) == len(backbone) and len(set(rest)) == len(rest)
    assert not set(backbone) & set(rest)
    assert set(backbone) | set(rest) == {id(p) for p in model.parameters()}
    assert set(backbone) == {id(p) for p in model.encoder.parameters()}
    assert id(model.classifier.weight) in rest


def test_attributes_come_from_encoder_and_head() -> None:
    model = make_model("mlp")
    assert model.input_mean == (0.485, 0.456, 0.406)
    assert model.input_std == (0.229, 0.224, 0.225)
    assert model.in_channels == 3
    assert model.min_input_size == 32
    assert model.feat_dim == model.head.feat_dim == 16
    assert make_model("fcn", "strides_4_8").min_input_size == 8


def test_replacing_the_classifier_replaces_the_heads() -> None:
    model = make_model("fcn").eval()
    assert not [k for k in model.state_dict() if k.startswith("classifier.")]
    model.classifier = nn.Identity()
    assert isinstance(model.head.classifier, nn.Identity)
    with torch.no_grad():
        logits, features = model(torch.randn(1, 3, 32, 32))
    torch.testing.assert_close(logits, features)
    assert not any(name.startswith("classifier") for name, _ in model.named_modules())


def test_sar_and_the_etf_wrapper_train_the_network() -> None:
    model = make_model("mlp").train()
    sar = SemanticAnchorRegularizer(model.num_classes, model.feat_dim, model.classifier)
    logits, features = model(torch.randn(2, 3, 64, 64))
    labels = torch.randint(0, 5, (2, 64, 64))
    loss = F.cross_entropy(F.interpolate(logits, size=(64, 64), mode="bilinear"), labels)
    (loss + sar(features, labels)["loss"]).backward()
    assert model.classifier.weight.grad is not None
    etf = FixedETFModel(make_model("fcn"), 5, dense=True).train()
    logits, features = etf(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 5, 16, 16) and features.shape == (2, etf.feat_dim, 16, 16)
    logits.sum().backward()
    assert all(p.grad is not None for p in etf.parameters() if p.requires_grad)


def test_fcn_head_matches_resize_concat_conv_bn_relu() -> None:
    channels, strides = (18, 36, 72, 144), (4, 8, 16, 32)
    head = FCNHead(channels, strides, 7).eval()
    assert head.feat_dim == 270 and head.output_stride == 4
    conv, bn = head.convs[0][0], head.convs[0][1]
    assert conv.kernel_size == (1, 1) and conv.in_channels == conv.out_channels == 270
    maps = maps_for(channels, [(12, 10), (6, 5), (3, 3), (2, 2)])
    with torch.no_grad():
        logits, features = head(maps)
        cat = torch.cat(
            [maps[0]] + [F.interpolate(m, size=(12, 10), mode="bilinear") for m in maps[1:]],
            dim=1,
        )
        expected = torch.relu(bn(F.conv2d(cat, conv.weight)))
    torch.testing.assert_close(features, expected)
    assert logits.shape == (2, 7, 12, 10)
    # parameters: 1x1 conv without bias, BN, classifier with bias
    assert sum(p.numel() for p in head.parameters()) == 270 * 270 + 2 * 270 + 270 * 7 + 7


def test_fcn_options() -> None:
    channels, strides = (4, 6), (4, 8)
    head = FCNHead(channels, strides, 3, channels=8, num_convs=2, kernel_size=3)
    assert head.feat_dim == 8 and len(head.convs) == 2
    assert head.convs[0][0].kernel_size == (3, 3) and head.convs[0][0].padding == (1, 1)
    assert head.convs[1][0].in_channels == 8
    bare = FCNHead(channels, strides, 3, num_convs=0).eval()
    maps = maps_for(channels, [(8, 8), (4, 4)])
    features = bare.forward_features(maps)
    assert bare.feat_dim == 10
    torch.testing.assert_close(features[:, :4], maps[0])


def test_mlp_head_matches_embed_upsample_fuse() -> None:
    channels, strides = (6, 8, 10), (4, 8, 16)
    head = MLPHead(channels, strides, 4, channels=5).eval()
    maps = maps_for(channels, [(8, 12), (4, 6), (2, 3)])
    with torch.no_grad():
        _, features = head(maps)
        embedded = [
            F.interpolate(
                F.conv2d(m, e.weight, e.bias), size=(8, 12), mode="bilinear", align_corners=False
            )
            for m, e in zip(maps, head.embed, strict=True)
        ]
        conv, bn = head.fuse[0], head.fuse[1]
        expected = torch.relu(bn(F.conv2d(torch.cat(embedded, dim=1), conv.weight)))
    torch.testing.assert_close(features, expected)
    assert head.feat_dim == 5 and head.output_stride == 4


@pytest.mark.parametrize(
    ("strides", "dilations"),
    [
        ((4, 8, 16, 32), (3, 6, 9)),
        ((4, 8, 16, 16), (6, 12, 18)),
        ((4, 8, 8, 8), (12, 24, 36)),
    ],
)
def test_deeplab_default_dilations_follow_the_last_stride(strides, dilations) -> None:
    head = DeepLabV3PlusHead((4, 4, 4, 4), strides, 3, channels=8)
    assert head.dilations == dilations
    atrous = [branch[0] for branch in head.aspp.branches[1:]]
    assert [conv.dilation for conv in atrous] == [(d, d) for d in dilations]
    assert [conv.padding for conv in atrous] == [(d, d) for d in dilations]


def test_deeplab_structure_and_explicit_dilations() -> None:
    head = DeepLabV3PlusHead((6, 8, 10, 12), (2, 4, 8, 16), 3, channels=8, dilations=(1, 2))
    assert head.dilations == (1, 2) and len(head.aspp.branches) == 3
    # the low-level map is the stride-4 one, projected to 48 channels
    assert head.low_level_index == 1 and head.output_stride == 4
    assert head.low_level[0].in_channels == 8 and head.low_level[0].out_channels == 48
    assert head.aspp.project[0].in_channels == 4 * 8
    assert head.decoder[0][0].in_channels == 8 + 48
    # no BatchNorm in the image pooling branch
    assert not any(isinstance(m, nn.BatchNorm2d) for m in head.aspp.image_pool.modules())
    maps = maps_for((6, 8, 10, 12), [(16, 16), (8, 8), (4, 4), (2, 2)], batch=1)
    logits, features = head.train()(maps)
    assert logits.shape == (1, 3, 8, 8) and features.shape == (1, 8, 8, 8)


def test_deeplab_image_pooling_is_the_broadcast_global_mean() -> None:
    head = DeepLabV3PlusHead((4, 6), (4, 16), 3, channels=8).eval()
    x = torch.randn(1, 6, 3, 5)
    pool = head.aspp.image_pool
    expected = torch.relu(pool.conv(x.mean(dim=(2, 3), keepdim=True))).expand(-1, -1, 3, 5)
    torch.testing.assert_close(pool(x), expected)


def test_separable_option_reduces_parameters() -> None:
    channels, strides = (24, 40, 112, 320), (4, 8, 16, 32)

    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    dense = DeepLabV3PlusHead(channels, strides, 19)
    separable = DeepLabV3PlusHead(channels, strides, 19, separable=True)
    assert count(separable) < 0.4 * count(dense)
    # one dense atrous branch: a 3x3 conv without bias and a BN
    assert count(dense.aspp.branches[1]) == 320 * 256 * 9 + 2 * 256
    # a separable one: depthwise 3x3 + BN, pointwise 1x1 + BN
    assert count(separable.aspp.branches[1]) == 320 * 9 + 2 * 320 + 320 * 256 + 2 * 256
    assert separable.aspp.branches[1][0].groups == 320


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_classes": 1}, ValueError, "num_classes must be >= 2"),
        ({"num_classes": 2.0}, TypeError, "num_classes must be an int"),
        ({"strides": (4, 8, 16)}, ValueError, "strides must have one entry per map"),
        ({"strides": (4, 16, 8, 32)}, ValueError, "strides must be non-decreasing"),
        ({"in_channels": []}, ValueError, "in_channels must not be empty"),
        ({"in_channels": (4, 0, 4, 4)}, ValueError, r"in_channels\[1\] must be >= 1"),
        ({"in_channels": 4}, TypeError, "in_channels must be a sequence"),
        ({"dropout": 1.5}, ValueError, r"dropout must lie in \[0, 1\]"),
    ],
)
@pytest.mark.parametrize("head", sorted(HEADS))
def test_head_constructor_errors(head, kwargs, error, match) -> None:
    args = {"in_channels": (4, 4, 4, 4), "strides": (4, 8, 16, 32), "num_classes": 3}
    args = {**args, "dropout": 0.1, **kwargs}
    with pytest.raises(error, match=match):
        HEADS[head](
            args["in_channels"], args["strides"], args["num_classes"], dropout=args["dropout"]
        )


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: FCNHead((4,), (4,), 3, kernel_size=2), "kernel_size must be odd"),
        (lambda: FCNHead((4,), (4,), 3, num_convs=-1), "num_convs must be >= 0"),
        (lambda: FCNHead((4, 4), (4, 8), 3, num_convs=0, channels=5), "channels must be None"),
        (lambda: DeepLabV3PlusHead((4,), (8,), 3, dilations=(6, 0)), r"dilations\[1\]"),
        (lambda: MLPHead((4,), (4,), 3, channels=0), "channels must be >= 1"),
    ],
)
def test_head_option_errors(build, match) -> None:
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("head", sorted(HEADS))
def test_head_rejects_bad_maps(head) -> None:
    channels, strides = (4, 6, 8, 10), (4, 8, 16, 32)
    module = HEADS[head](channels, strides, 3)
    maps = maps_for(channels, [(8, 8), (4, 4), (2, 2), (1, 1)])
    with pytest.raises(ValueError, match="maps must hold 4 tensors"):
        module(maps[:3])
    with pytest.raises(TypeError, match="maps must be a list"):
        module(maps[0])
    with pytest.raises(ValueError, match=r"maps\[2\] must have shape \(B, 8, h, w\)"):
        module([maps[0], maps[1], torch.randn(2, 9, 2, 2), maps[3]])
    with pytest.raises(ValueError, match=r"maps\[1\] must have the batch size"):
        module([maps[0], maps[1][:1], maps[2], maps[3]])
    with pytest.raises(TypeError, match=r"maps\[0\] must be a floating-point"):
        module([maps[0].long(), *maps[1:]])


def test_deeplab_refuses_single_value_batchnorm_in_training() -> None:
    head = DeepLabV3PlusHead((4, 6), (4, 32), 3, channels=8).train()
    maps = maps_for((4, 6), [(8, 8), (1, 1)], batch=1)
    with pytest.raises(ValueError, match=r"maps\[1\] must hold more than one value"):
        head(maps)
    logits, _ = head.eval()(maps)
    assert logits.shape == (1, 3, 8, 8)


def test_encoder_decoder_input_errors() -> None:
    model = make_model("deeplab")
    with pytest.raises(ValueError, match=r"x must be at least 32x32 .* got \(2, 3, 31, 64\)"):
        model(torch.randn(2, 3, 31, 64))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3, H, W\), got \(2, 1, 64, 64\)"):
        model(torch.randn(2, 1, 64, 64))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3, H, W\), got \(3, 64, 64\)"):
        model.forward_features(torch.randn(3, 64, 64))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        model(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        model([[0.0]])
    with pytest.raises(ValueError, match="training batch of one image must be larger than 32"):
        model.train()(torch.randn(1, 3, 32, 32))
    logits, _ = model.eval()(torch.randn(1, 3, 32, 32))
    assert logits.shape == (1, 5, 8, 8)


def test_encoder_decoder_construction_errors() -> None:
    enc = FakeEncoder()
    with pytest.raises(ValueError, match="head must be built for the encoder's maps"):
        EncoderDecoder(enc, FCNHead((6, 8, 10, 13), (4, 8, 16, 32), 3))
    with pytest.raises(ValueError, match="head must be built for the encoder's maps"):
        EncoderDecoder(enc, FCNHead((6, 8, 10, 12), (4, 8, 16, 16), 3))
    with pytest.raises(TypeError, match="head must be a DecodeHead"):
        EncoderDecoder(enc, nn.Conv2d(1, 1, 1))
    with pytest.raises(TypeError, match=r"encoder\.out_channels must be a sequence of ints"):
        EncoderDecoder(nn.Conv2d(3, 3, 1), FCNHead((3,), (1,), 3))
    labelled = FakeEncoder()
    labelled.in_channels = 3
    with pytest.raises(ValueError, match=r"in_channels must match the encoder's \(3\), got 1"):
        EncoderDecoder(labelled, FCNHead((6, 8, 10, 12), (4, 8, 16, 32), 3), in_channels=1)
    no_statistics = FakeEncoder()
    del no_statistics.input_std
    with pytest.raises(TypeError, match=r"encoder\.input_std must be a non-empty sequence"):
        EncoderDecoder(no_statistics, FCNHead((6, 8, 10, 12), (4, 8, 16, 32), 3))
    grey = EncoderDecoder(FakeEncoder(1), FCNHead((6, 8, 10, 12), (4, 8, 16, 32), 3))
    assert grey.in_channels == 1
    assert EncoderDecoder(enc, FCNHead((6, 8, 10, 12), (4, 8, 16, 32), 3), in_channels=3)


def test_builders_are_registered() -> None:
    assert {"fcn", "deeplabv3plus", "mlp_head"} <= set(list_models())


# --- the registered builders on the real encoders ---------------------------------------------


@pytest.mark.parametrize(
    ("name", "kwargs", "feat_dim"),
    [
        ("mlp_head", {}, 256),
        ("fcn", {"encoder": "efficientnet_lite0"}, 24 + 40 + 112 + 320),
        ("deeplabv3plus", {"encoder": "efficientnet_lite0", "separable": True}, 256),
    ],
)
def test_builders_on_efficientnet_lite0(name, kwargs, feat_dim) -> None:
    model = create_model(name, num_classes=4, in_channels=3, **kwargs)
    assert isinstance(model, EncoderDecoder)
    assert model.feat_dim == feat_dim and model.num_classes == 4
    assert model.min_input_size == 32 and model.output_stride == 4
    logits, features = model.train()(torch.randn(1, 3, 64, 80))
    assert logits.shape == (1, 4, 16, 20) and features.shape == (1, feat_dim, 16, 20)
    model.eval()
    with torch.no_grad():
        logits, features = model(torch.randn(1, 3, 64, 64))
    torch.testing.assert_close(model.classifier(features), logits)
    groups = model.param_groups()
    assert len(groups["backbone"]) + len(groups["head"]) == len(list(model.parameters()))


def test_fcn_on_hrnet_w18_has_the_published_size() -> None:
    # mmsegmentation lists FCN on HRNet-W18 at 9.64 M parameters (19 classes)
    model = create_model("fcn", num_classes=19, encoder="hrnet_w18")
    assert model.feat_dim == 270 and model.head.convs[0][0].in_channels == 270
    assert 9.6e6 <= sum(p.numel() for p in model.parameters()) <= 9.7e6
    logits, features = model.train()(torch.randn(1, 3, 50, 70))
    assert logits.shape == (1, 19, 13, 18) and features.shape == (1, 270, 13, 18)


def test_encoder_kwargs_reach_the_encoder() -> None:
    model = create_model(
        "deeplabv3plus",
        num_classes=3,
        encoder_kwargs={"output_stride": 16},
        channels=32,
        separable=True,
    )
    assert model.encoder.strides == (4, 8, 16, 16)
    assert model.head.dilations == (6, 12, 18)
    assert model.min_input_size == 16


def test_deeplabv3plus_default_resnet50_output_stride_8() -> None:
    model = create_model("deeplabv3plus", num_classes=3, in_channels=1, dropout=0.0)
    assert model.head.dilations == (12, 24, 36)
    assert model.head.aspp.branches[0][0].in_channels == 2048
    assert model.head.low_level[0].in_channels == 256
    assert model.min_input_size == 8
    with torch.no_grad():
        logits, features = model.eval()(torch.randn(1, 1, 64, 64))
    assert logits.shape == (1, 3, 16, 16) and features.shape == (1, 256, 16, 16)


def test_builder_argument_errors() -> None:
    with pytest.raises(ValueError, match="encoder_kwargs must not hold 'pretrained'"):
        create_model("mlp_head", num_classes=3, encoder_kwargs={"pretrained": "imagenet"})
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        create_model("fcn", num_classes=1)
    with pytest.raises(TypeError, match="encoder_kwargs must be a dict"):
        create_model("mlp_head", num_classes=3, encoder_kwargs=["x"])
    with pytest.raises(TypeError, match="encoder_weights must be None, 'imagenet' or a path"):
        create_model("mlp_head", num_classes=3, encoder_weights=True)
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        create_model("mlp_head", num_classes=3, encoder="efficientnet_b9")


@pytest.mark.slow
def test_fcn_default_hrnet_w48() -> None:
    # the SAR release's model; mmsegmentation lists FCN on HRNet-W48 at 65.9 M parameters
    model = create_model("fcn", num_classes=19)
    assert model.feat_dim == 720 and model.output_stride == 4
    assert 65.8e6 <= sum(p.numel() for p in model.parameters()) <= 65.95e6
    with torch.no_grad():
        logits, features = model.eval()(torch.randn(1, 3, 64, 64))
    assert logits.shape == (1, 19, 16, 16) and features.shape == (1, 720, 16, 16)
