"""The strong view of semi-supervised training: StrongAugment / strong_augment."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anchorlearn.data.augment import StrongAugment, _equalize, strong_augment


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype_range(channels: int, dtype: torch.dtype) -> None:
    x = torch.rand(16, channels, 28, 28, dtype=dtype)
    out = strong_augment(28)(x)
    assert out.shape == x.shape and out.dtype == dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_non_square_images_and_half_precision() -> None:
    aug = strong_augment((12, 20))
    x = torch.rand(5, 3, 12, 20)
    assert aug(x).shape == x.shape
    assert aug(x.half()).dtype == torch.float16


@pytest.mark.parametrize("channels", [1, 3])
def test_reproducible_under_manual_seed(channels: int) -> None:
    aug = strong_augment(16)
    x = torch.rand(8, channels, 16, 16)
    torch.manual_seed(3)
    a = aug(x)
    torch.manual_seed(3)
    b = aug(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, aug(x))


def test_every_image_draws_its_own_parameters() -> None:
    x = torch.rand(1, 1, 28, 28).repeat(12, 1, 1, 1)
    out = strong_augment(28)(x)
    flat = out.flatten(1)
    distinct = {tuple(row.tolist()) for row in flat}
    assert len(distinct) == 12
    assert all(not torch.equal(out[i], x[i]) for i in range(12))


def test_cutout_is_a_half_side_square_of_fill_value() -> None:
    # a black image stays black through every other step: only the cutout square shows
    aug = strong_augment(16)
    out = aug(torch.zeros(64, 1, 16, 16))
    assert set(out.unique().tolist()) <= {0.0, 0.5}
    filled = (out == 0.5).flatten(1).sum(1)
    assert int(filled.max()) == 8 * 8  # a square of half the side when wholly inside
    assert int(filled.min()) >= 4 * 4  # centred in the image: at least a quarter inside
    rows = (out[:, 0] == 0.5).any(2).sum(1)
    cols = (out[:, 0] == 0.5).any(1).sum(1)
    assert torch.equal(filled, rows * cols)  # a rectangle (clipped at the edges)


def test_without_cutout_and_warp_the_tone_ops_keep_a_constant_image_in_range() -> None:
    aug = StrongAugment(8, max_rotation=0, max_shear=0, max_translate=0, cutout=0)
    out = aug(torch.full((32, 3, 8, 8), 0.25))
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    # each image stays constant: every step acts on all its pixels alike
    assert torch.equal(out.amax(dim=(1, 2, 3)), out.amin(dim=(1, 2, 3)))


def test_equalize_matches_a_direct_computation() -> None:
    rng = np.random.default_rng(0)
    levels = rng.integers(10, 60, size=(2, 1, 6, 6))
    x = torch.from_numpy(levels / 255.0)
    out = _equalize(x)
    for b in range(2):
        values = levels[b, 0].reshape(-1)
        counts = np.array([(values <= v).sum() for v in range(256)], dtype=np.float64)
        first = counts[values.min()]
        expected = (counts[values] - first) / (values.size - first)
        np.testing.assert_allclose(out[b, 0].reshape(-1).numpy(), expected, atol=1e-12)
    constant = torch.full((1, 1, 4, 4), 0.3, dtype=torch.float64)
    assert torch.equal(_equalize(constant), constant)


def test_input_checks() -> None:
    aug = strong_augment(8)
    with pytest.raises(TypeError, match=r"images must be a float tensor \(B, C, H, W\)"):
        aug(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"images must be 8x8 .* got \(2, 1, 9, 9\)"):
        aug(torch.rand(2, 1, 9, 9))
    with pytest.raises(ValueError, match="max_rotation must be a finite number >= 0"):
        StrongAugment(8, max_rotation=-1)
    with pytest.raises(ValueError, match=r"cutout must lie in \[0, 1\]"):
        StrongAugment(8, cutout=1.5)
    with pytest.raises(ValueError, match=r"brightness must be \(low, high\)"):
        StrongAugment(8, brightness=(1.5, 0.5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_same_result_on_cuda_as_on_the_cpu() -> None:
    aug = strong_augment(16)
    x = torch.rand(8, 3, 16, 16)
    torch.manual_seed(5)
    cpu = aug(x)
    torch.manual_seed(5)
    cuda = aug(x.cuda())
    assert cuda.device.type == "cuda"
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-4, atol=1e-4)
