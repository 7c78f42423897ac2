import pytest
import torch

from anchorlearn.data.augment import (
    TwoViewTransform,
    classification_train_augment,
    segmentation_train_augment,
    ssl_augment,
)


@pytest.mark.parametrize("factory", [classification_train_augment, ssl_augment])
@pytest.mark.parametrize("channels", [1, 3])
def test_image_augment_shapes_dtype_reproducible(factory, channels):
    x = torch.rand(6, channels, 16, 16)
    aug = factory(16)
    torch.manual_seed(1)
    a = aug(x)
    torch.manual_seed(1)
    b = aug(x)
    assert a.shape == x.shape and a.dtype == torch.float32
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, aug(x))
    assert aug(x.double()).dtype == torch.float64


def test_augment_rejects_uint8():
    with pytest.raises(
        TypeError, match=r"images must be a float tensor \(B, C, H, W\), got torch.uint8"
    ):
        classification_train_augment(8)(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))


def test_segmentation_augment_keeps_labels():
    x = torch.rand(8, 3, 24, 24)
    masks = torch.randint(0, 4, (8, 24, 24))
    masks[:, :2] = 255
    aug = segmentation_train_augment(24)
    torch.manual_seed(2)
    a, ma = aug(x, masks)
    torch.manual_seed(2)
    b, mb = aug(x, masks)
    assert a.shape == x.shape and ma.shape == masks.shape and ma.dtype == torch.int64
    torch.testing.assert_close(a, b)
    assert torch.equal(ma, mb)
    assert set(ma.unique().tolist()) <= {0, 1, 2, 3, 255}


def test_segmentation_geometry_shared():
    # the image is a copy of the mask (in 4x4 blocks): after the joint transform they agree
    # everywhere except where bilinear (image) and nearest (mask) sampling differ at edges
    blocks = torch.randint(0, 3, (4, 4, 4))
    masks = blocks.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)
    x = masks[:, None].float().repeat(1, 3, 1, 1) / 2.0
    aug = segmentation_train_augment(16)
    aug.pipeline[2].p = 0.0  # no colour jitter
    a, m = aug(x, masks)
    agreement = ((a[:, 0] * 2.0).round().long() == m).float().mean()
    assert agreement > 0.85


def test_segmentation_mask_errors():
    aug = segmentation_train_augment(8)
    with pytest.raises(TypeError, match=r"masks must be an integer tensor"):
        aug(torch.rand(2, 3, 8, 8), torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match=r"masks must have shape \(2, 8, 8\)"):
        aug(torch.rand(2, 3, 8, 8), torch.zeros(2, 4, 4, dtype=torch.long))


def test_two_views_differ_and_reproduce():
    x = torch.rand(4, 1, 12, 12)
    views = TwoViewTransform(ssl_augment(12))
    torch.manual_seed(3)
    v1, v2 = views(x)
    torch.manual_seed(3)
    w1, w2 = views(x)
    assert v1.shape == v2.shape == x.shape
    assert not torch.equal(v1, v2)
    torch.testing.assert_close(v1, w1)
    torch.testing.assert_close(v2, w2)
