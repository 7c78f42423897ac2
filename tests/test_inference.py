import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anchorlearn.inference import segment, slide_windows
from anchorlearn.models.segmentation import SmallUNet

TIGHT = {"rtol": 1e-6, "atol": 1e-6}


def _pointwise(num_classes: int = 4, in_channels: int = 3) -> nn.Module:
    return nn.Conv2d(in_channels, num_classes, 1).eval()


class _Conv3x3(nn.Module):
    """Full-resolution logits that depend on the neighbourhood (zero padding at borders)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.conv(x)
        return logits, logits


class _Stride4(nn.Module):
    """Logits at a quarter of the input size, with a ramp over the input's columns."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        small = F.avg_pool2d(x, 4, ceil_mode=True)
        logits = self.conv(small)
        ramp = torch.linspace(0, 1, logits.shape[-1], dtype=x.dtype)
        return logits + ramp, small


def _reference_slide(model, images, crop, stride):
    """Loop over the crops of each image; average the crop logits with a count map."""
    _, _, height, width = images.shape
    ch, cw = crop
    sh, sw = stride
    pad_h, pad_w = max(ch - height, 0), max(cw - width, 0)
    padded = F.pad(images, (0, pad_w, 0, pad_h))
    ph, pw = padded.shape[-2:]
    ys = sorted(set(range(0, ph - ch, sh)) | {ph - ch})
    xs = sorted(set(range(0, pw - cw, sw)) | {pw - cw})
    outputs = []
    for image in padded:
        acc, count = None, torch.zeros(ph, pw)
        for y in ys:
            for x in xs:
                out = model(image[None, :, y : y + ch, x : x + cw])
                out = out[0] if isinstance(out, tuple) else out
                out = F.interpolate(out, size=(ch, cw), mode="bilinear", align_corners=False)[0]
                if acc is None:
                    acc = torch.zeros(out.shape[0], ph, pw)
                acc[:, y : y + ch, x : x + cw] += out
                count[y : y + ch, x : x + cw] += 1
        outputs.append((acc / count)[:, :height, :width])
    return torch.stack(outputs)


def test_slide_windows_follow_the_grid_with_the_last_crop_on_the_border() -> None:
    windows = slide_windows((10, 8), (4, 8), (3, 5))
    assert windows == [(0, 4, 0, 8), (3, 7, 0, 8), (6, 10, 0, 8)]
    assert slide_windows((4, 4), (4, 4), (2, 2)) == [(0, 4, 0, 4)]


@pytest.mark.parametrize(
    ("size", "crop", "stride"),
    [
        ((12, 16), (4, 4), (4, 4)),  # tiles
        ((12, 16), (5, 6), (3, 2)),  # overlap, sizes not divisible
        ((11, 13), (8, 8), (8, 8)),  # last crop moved back to the border
        ((5, 7), (8, 9), (4, 4)),  # image smaller than the crop: padded
        ((5, 20), (8, 6), (8, 5)),  # smaller in one dimension only
    ],
)
def test_pointwise_model_gives_the_same_logits_whole_slide_and_flipped(size, crop, stride):
    model = _pointwise()
    images = torch.randn(2, 3, *size)
    whole = segment(model, images)
    torch.testing.assert_close(whole, model(images))
    slide = segment(model, images, mode="slide", crop_size=crop, stride=stride)
    torch.testing.assert_close(slide, whole, **TIGHT)
    torch.testing.assert_close(segment(model, images, flip=True), whole, **TIGHT)
    flipped = segment(model, images, mode="slide", crop_size=crop, stride=stride, flip=True)
    torch.testing.assert_close(flipped, whole, **TIGHT)


@pytest.mark.parametrize(
    ("model", "crop", "stride"),
    [
        (_Conv3x3(), (6, 8), (4, 5)),
        (_Conv3x3(), (8, 8), (8, 8)),
        (_Stride4(), (8, 12), (4, 8)),
        (_Stride4(), (16, 24), (8, 8)),  # larger than the image
    ],
)
def test_position_dependent_model_matches_a_loop_over_crops(model, crop, stride) -> None:
    model.eval()
    images = torch.randn(2, 3, 14, 19)
    slide = segment(model, images, mode="slide", crop_size=crop, stride=stride)
    torch.testing.assert_close(slide, _reference_slide(model, images, crop, stride), **TIGHT)
    whole = segment(model, images)
    assert whole.shape == slide.shape == (2, model.conv.out_channels, 14, 19)
    assert not torch.allclose(slide, whole, atol=1e-3)


def test_slide_differs_from_whole_only_near_the_crop_borders() -> None:
    model = _Conv3x3().eval()
    images = torch.randn(1, 3, 8, 16)
    # two crops side by side: columns 0-7 and 8-15; a 3x3 conv sees the zero padding at
    # the seam (columns 7 and 8) instead of the neighbouring crop
    slide = segment(model, images, mode="slide", crop_size=(8, 8))
    whole = segment(model, images)
    differs = (slide - whole).abs().amax(dim=(0, 1, 2)) > 1e-6
    assert differs.nonzero().flatten().tolist() == [7, 8]


def test_stride4_model_output_is_at_the_input_size() -> None:
    model = SmallUNet(num_classes=3, width=4, feat_dim=8).eval()
    images = torch.randn(2, 3, 16, 24)
    whole = segment(model, images)
    logits, _ = model(images)
    expected = F.interpolate(logits, size=(16, 24), mode="bilinear", align_corners=False)
    assert whole.shape == (2, 3, 16, 24)
    torch.testing.assert_close(whole, expected)
    # crops of 16x16 keep the sizes divisible by 8; a smaller image is padded to the crop
    slide = segment(model, images, mode="slide", crop_size=16, stride=8)
    assert slide.shape == (2, 3, 16, 24)
    small = segment(model, images[:, :, :10, :13], mode="slide", crop_size=16)
    assert small.shape == (2, 3, 10, 13)


def test_single_scale_equals_whole_and_multi_scale_flip_matches_a_reference() -> None:
    model = _Stride4().eval()
    images = torch.randn(2, 3, 12, 20)
    whole = segment(model, images)
    assert torch.equal(segment(model, images, scales=(1.0,)), whole)
    assert torch.equal(segment(model, images, scales=[1]), whole)

    def one_pass(x: torch.Tensor) -> torch.Tensor:
        out = F.interpolate(model(x)[0], size=(12, 20), mode="bilinear", align_corners=False)
        return out

    expected = []
    for size in [(8, 13), (15, 25)]:  # 0.625 and 1.25 of (12, 20), halves rounded up
        x = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        expected += [one_pass(x), one_pass(x.flip(-1)).flip(-1)]
    reference = torch.stack(expected).mean(0)
    result = segment(model, images, scales=(0.625, 1.25), flip=True)
    torch.testing.assert_close(result, reference, **TIGHT)


def test_multi_scale_slide_resizes_the_averaged_crops_back() -> None:
    model = _Conv3x3().eval()
    images = torch.randn(1, 3, 10, 12)
    result = segment(model, images, mode="slide", crop_size=6, stride=4, scales=(2.0,))
    big = F.interpolate(images, size=(20, 24), mode="bilinear", align_corners=False)
    reference = F.interpolate(
        _reference_slide(model, big, (6, 6), (4, 4)), size=(10, 12), mode="bilinear"
    )
    torch.testing.assert_close(result, reference, **TIGHT)


def test_batch_size_bounds_the_crops_per_pass_without_changing_the_result() -> None:
    inner = _Conv3x3().eval()
    sizes: list[int] = []

    def counting(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sizes.append(x.shape[0])
        return inner(x)

    images = torch.randn(2, 3, 10, 12)
    default = segment(counting, images, mode="slide", crop_size=6, stride=4)
    assert sizes == [2] * 6  # one crop position of both images per pass (2 x 3 windows)
    sizes.clear()
    chunked = segment(counting, images, mode="slide", crop_size=6, stride=4, batch_size=5)
    assert sizes == [5, 5, 2]
    torch.testing.assert_close(chunked, default, **TIGHT)
    sizes.clear()
    segment(counting, images, batch_size=1)
    assert sizes == [1, 1]


def test_dtype_device_grad_and_mode_are_kept() -> None:
    model = _Conv3x3().double().eval()
    images = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    out = segment(model, images, mode="slide", crop_size=4, stride=2, flip=True)
    assert out.dtype == torch.float32 and out.device == images.device
    assert not out.requires_grad
    assert not model.training


def test_training_mode_warns_and_is_left_alone() -> None:
    model = _pointwise().train()
    with pytest.warns(UserWarning, match=r"training mode.*model\.eval\(\)") as record:
        segment(model, torch.randn(1, 3, 4, 4))
    assert record[0].filename == __file__
    assert model.training


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"mode": "tiles"}, ValueError, "mode must be one of whole, slide, got 'tiles'"),
        ({"mode": "slide"}, ValueError, "crop_size must be given"),
        ({"mode": "slide", "crop_size": 4, "stride": 5}, ValueError, "stride must not exceed"),
        ({"mode": "slide", "crop_size": (4, 4), "stride": (2, 0)}, ValueError, "stride must be"),
        ({"mode": "slide", "crop_size": (4, -1)}, ValueError, "crop_size must be positive"),
        ({"mode": "slide", "crop_size": (4, 4, 4)}, TypeError, "crop_size must be an int or"),
        ({"crop_size": 4}, ValueError, "crop_size and stride apply to mode='slide' only"),
        ({"scales": ()}, ValueError, "scales must hold at least one"),
        ({"scales": (1.0, 0.0)}, ValueError, "scales must be finite and > 0, got 0.0"),
        ({"scales": 1.0}, TypeError, "scales must be a sequence"),
        ({"flip": 1}, TypeError, "flip must be a bool"),
        ({"batch_size": 0}, ValueError, "batch_size must be >= 1"),
    ],
)
def test_bad_arguments(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        segment(_pointwise(), torch.randn(1, 3, 8, 8), **kwargs)


def test_bad_images_and_model_outputs() -> None:
    model = _pointwise()
    with pytest.raises(TypeError, match="images must be a floating-point tensor"):
        segment(model, torch.zeros(1, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"images must be a non-empty 4-D tensor.*\(3, 4, 4\)"):
        segment(model, torch.randn(3, 4, 4))
    with pytest.raises(TypeError, match=r"images must be a torch\.Tensor"):
        segment(model, [[1.0]])
    with pytest.raises(ValueError, match=r"model output must be 4-D logits.*got shape \(1, 4\)"):
        segment(lambda x: x.mean(dim=(2, 3)) @ torch.ones(3, 4), torch.randn(1, 3, 4, 4))
    with pytest.raises(TypeError, match="model must return logits"):
        segment(lambda x: ("logits",), torch.randn(1, 3, 4, 4))
    with pytest.raises(TypeError, match="model output must be floating-point"):
        segment(lambda x: x.long(), torch.randn(1, 3, 4, 4))
