import numpy as np
import pytest
import torch

from anchorlearn.data.seg_transforms import (
    PhotometricDistortion,
    RandomRescaleCrop,
    ResizeToScale,
    keep_ratio_size,
)


def sample(height: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    mask = rng.choice(np.array([0, 3, 7, 255]), size=(height, width)).astype(np.int64)
    return image, mask


def formula_size(h: int, w: int, base: tuple[int, int], r: float) -> tuple[int, int]:
    """mmsegmentation's Resize(img_scale=base, ratio_range, keep_ratio=True), written out."""
    target_long, target_short = int(max(base) * r), int(min(base) * r)
    factor = min(target_long / max(h, w), target_short / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


@pytest.mark.parametrize(("height", "width"), [(5, 7), (20, 30), (80, 50)])
def test_output_is_exactly_the_crop_size(height, width):
    transform = RandomRescaleCrop((24, 32), ratio_range=(0.5, 2.0))
    image, mask = sample(height, width)
    for seed in range(5):
        out_image, out_mask = transform(image, mask, np.random.default_rng(seed))
        assert out_image.shape == (24, 32, 3) and out_image.dtype == np.uint8
        assert out_mask.shape == (24, 32) and out_mask.dtype == np.int64


def test_small_image_is_padded_with_ignore_and_pad_value():
    image = np.full((6, 8, 3), 200, np.uint8)
    mask = np.full((6, 8), 4, np.int64)
    transform = RandomRescaleCrop(
        (10, 12), ratio_range=(1.0, 1.0), cat_max_ratio=1.0, flip=False, pad_value=7
    )
    out_image, out_mask = transform(image, mask, np.random.default_rng(0))
    assert (out_image[:6, :8] == 200).all() and (out_image[6:] == 7).all()
    assert (out_image[:, 8:] == 7).all()
    assert (out_mask[:6, :8] == 4).all() and (out_mask[6:] == 255).all()
    assert (out_mask[:, 8:] == 255).all()


@pytest.mark.parametrize(
    ("base", "size"), [((64, 32), (30, 40)), ((32, 64), (30, 40)), (None, (21, 13))]
)
def test_rescale_follows_the_ratio_law(base, size):
    h, w = size
    transform = RandomRescaleCrop((300, 300), base_size=base, ratio_range=(0.5, 2.0), flip=False)
    image = np.zeros((h, w, 3), np.uint8)
    mask = np.ones((h, w), np.int64)
    for seed in range(6):
        r = np.random.default_rng(seed).uniform(0.5, 2.0)  # the first draw is the ratio
        expected = formula_size(h, w, base or (max(h, w), min(h, w)), r)
        assert transform.rescaled_size(h, w, r) == expected
        _, out_mask = transform(image, mask, np.random.default_rng(seed))
        labelled = np.argwhere(out_mask == 1)
        assert tuple(labelled.max(axis=0) + 1) == expected  # padded beyond the rescaled image
        assert (out_mask == 1).sum() == expected[0] * expected[1]


def test_keep_ratio_size_bounds_both_edges():
    assert keep_ratio_size(512, 1024, (2048, 512)) == (512, 1024)  # short edge bound
    assert keep_ratio_size(100, 1000, (2048, 512)) == (205, 2048)  # long edge bound
    assert keep_ratio_size(3, 4, (8, 8)) == (6, 8)
    out = ResizeToScale((2048, 512))(np.zeros((100, 1000, 3), np.uint8))
    assert out.shape == (205, 2048, 3)
    image, mask = ResizeToScale(8)(np.zeros((3, 4, 3), np.uint8), np.arange(12).reshape(3, 4))
    assert image.shape == (6, 8, 3) and mask.dtype == np.int64
    np.testing.assert_array_equal(mask, np.arange(12).reshape(3, 4).repeat(2, 0).repeat(2, 1))


def cap_ok(crop: np.ndarray, cap: float) -> bool:
    values, counts = np.unique(crop[crop != 255], return_counts=True)
    return len(values) > 1 and counts.max() / counts.sum() < cap


def test_cat_max_ratio_caps_the_dominant_class():
    # class 1 fills columns 0-15, class 2 columns 16-23: a 16x16 crop at column offset
    # left (0-8) keeps class 1 under 75 % of its pixels only for left >= 5 (4 of 9 offsets)
    mask = np.ones((16, 24), np.int64)
    mask[:, 16:] = 2
    image = np.zeros((16, 24, 3), np.uint8)
    capped = RandomRescaleCrop((16, 16), ratio_range=(1.0, 1.0), cat_max_ratio=0.75, flip=False)
    free = RandomRescaleCrop((16, 16), ratio_range=(1.0, 1.0), cat_max_ratio=1.0, flip=False)
    results_capped = [capped(image, mask, np.random.default_rng(s))[1] for s in range(30)]
    results_free = [free(image, mask, np.random.default_rng(s))[1] for s in range(30)]
    assert all(cap_ok(crop, 0.75) for crop in results_capped)
    assert sum(cap_ok(crop, 0.75) for crop in results_free) < 22  # without the cap, many fail


def test_cat_max_ratio_gives_up_after_ten_retries():
    # no crop can satisfy the cap (one class): the transform still returns a crop
    mask = np.full((40, 40), 3, np.int64)
    transform = RandomRescaleCrop(16, ratio_range=(1.0, 1.0), cat_max_ratio=0.5)
    _, out_mask = transform(np.zeros((40, 40, 3), np.uint8), mask, np.random.default_rng(0))
    assert (out_mask == 3).all()


def test_mask_values_are_never_invented():
    image, mask = sample(37, 53)
    transform = RandomRescaleCrop((40, 40), base_size=(60, 30))
    for seed in range(10):
        _, out_mask = transform(image, mask, np.random.default_rng(seed))
        assert set(np.unique(out_mask)) <= {0, 3, 7, 255}


def test_flip_mirrors_image_and_mask_together():
    image = np.zeros((8, 8, 3), np.uint8)
    image[:, :2] = 255
    mask = np.zeros((8, 8), np.int64)
    mask[:, :2] = 1
    transform = RandomRescaleCrop(8, ratio_range=(1.0, 1.0), cat_max_ratio=1.0, flip=True)
    flipped = 0
    for seed in range(20):
        out_image, out_mask = transform(image, mask, np.random.default_rng(seed))
        np.testing.assert_array_equal(out_image[..., 0] == 255, out_mask == 1)
        flipped += int(out_mask[0, -1] == 1)
    assert 3 <= flipped <= 17


def test_same_seed_same_result():
    image, mask = sample(45, 61, seed=3)
    transform = RandomRescaleCrop((32, 32), base_size=(64, 48))
    first = transform(image, mask, np.random.default_rng(11))
    second = transform(image, mask, np.random.default_rng(11))
    other = transform(image, mask, np.random.default_rng(12))
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert not np.array_equal(first[0], other[0])


def test_bad_arguments():
    with pytest.raises(TypeError, match=r"crop_size must be an int or a pair of ints, got 'a'"):
        RandomRescaleCrop("a")
    with pytest.raises(ValueError, match=r"crop_size must be >= 1, got \(0, 4\)"):
        RandomRescaleCrop((0, 4))
    with pytest.raises(ValueError, match=r"ratio_range must satisfy 0 < low <= high"):
        RandomRescaleCrop(4, ratio_range=(2.0, 1.0))
    with pytest.raises(ValueError, match=r"cat_max_ratio must lie in \(0, 1\], got 1.5"):
        RandomRescaleCrop(4, cat_max_ratio=1.5)
    transform = RandomRescaleCrop(4)
    image, mask = sample(6, 6)
    with pytest.raises(TypeError, match=r"image must be a uint8 numpy array \(H, W, 3\)"):
        transform(image.astype(np.float32), mask, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"mask must have shape \(6, 6\) to match image"):
        transform(image, mask[:5], np.random.default_rng(0))
    with pytest.raises(TypeError, match=r"rng must be a numpy.random.Generator, got int"):
        transform(image, mask, 0)


def test_photometric_keeps_shape_dtype_and_range():
    images = torch.rand(4, 3, 10, 12, dtype=torch.float64)
    out = PhotometricDistortion()(images)
    assert out.shape == images.shape and out.dtype == torch.float64
    assert out.min() >= 0 and out.max() <= 1
    always = PhotometricDistortion(p=1.0)(images.float())
    assert always.dtype == torch.float32 and not torch.allclose(always, images.float())
    torch.testing.assert_close(PhotometricDistortion(p=0.0)(images), images)
    torch.manual_seed(5)
    first = PhotometricDistortion()(images)
    torch.manual_seed(5)
    torch.testing.assert_close(PhotometricDistortion()(images), first)


def test_photometric_brightness_alone_is_a_bounded_shift():
    images = torch.full((64, 3, 2, 2), 0.5)
    out = PhotometricDistortion(
        contrast_range=(1.0, 1.0), saturation_range=(1.0, 1.0), hue_delta=0.0, p=1.0
    )(images)
    shift = out - images
    # one offset per image, the same for every pixel and channel, within +-32/255
    torch.testing.assert_close(shift, shift[:, :1, :1, :1].expand_as(shift))
    assert shift.abs().max() <= 32 / 255 + 1e-6 and shift.abs().max() > 16 / 255


def test_photometric_rejects_bad_input():
    with pytest.raises(TypeError, match=r"images must be a float tensor \(B, 3, H, W\)"):
        PhotometricDistortion()(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"p must lie in \[0, 1\], got 2.0"):
        PhotometricDistortion(p=2.0)


def test_photometric_ranges_must_be_pairs() -> None:
    from anchorlearn.data.seg_transforms import PhotometricDistortion

    with pytest.raises(TypeError, match=r"contrast_range must be a pair \(low, high\), got 0.5"):
        PhotometricDistortion(contrast_range=0.5)
    with pytest.raises(TypeError, match="saturation_range must be a pair"):
        PhotometricDistortion(saturation_range=(0.5, 1.0, 1.5))
