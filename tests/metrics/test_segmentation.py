import math

import pytest
import torch

from anchorlearn.metrics import SegmentationIoU, mean_iou


def test_iou_of_known_confusion_with_ignore() -> None:
    target = torch.tensor([[[0, 0, 1, 1], [1, 2, 255, 255]]])
    pred = torch.tensor([[[0, 1, 1, 1], [0, 2, 3, 0]]])
    result = mean_iou(pred, target, num_classes=5, class_to_group=["h", "h", "t", "t", "t"])
    # class 0: inter 1, union 3; class 1: inter 2, union 4; class 2: 1/1;
    # class 3 predicted only on ignored pixels -> absent; class 4 absent.
    iou = result["iou"]
    torch.testing.assert_close(iou[:3], torch.tensor([1 / 3, 0.5, 1.0], dtype=torch.float64))
    assert math.isnan(iou[3]) and math.isnan(iou[4])
    assert result["miou"] == pytest.approx((1 / 3 + 0.5 + 1.0) / 3)
    assert result["miou_h"] == pytest.approx((1 / 3 + 0.5) / 2)
    assert result["miou_t"] == pytest.approx(1.0)


def test_accumulates_over_batches_like_one_batch() -> None:
    target = torch.randint(0, 4, (4, 8, 8))
    target[:, 0] = 255
    logits = torch.randn(4, 4, 8, 8)
    metric = SegmentationIoU(4)
    metric.update(logits[:2], target[:2])
    metric.update(logits[2:], target[2:])
    torch.testing.assert_close(metric.compute()["iou"], mean_iou(logits, target, 4)["iou"])
    metric.reset()
    metric.update(target.clamp_max(3), target)
    assert metric.compute()["miou"] == pytest.approx(1.0)


def test_bad_inputs() -> None:
    metric = SegmentationIoU(3)
    with pytest.raises(ValueError, match="spatial size"):
        metric.update(torch.randn(1, 3, 4, 4), torch.zeros(1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="num_classes=3"):
        metric.update(torch.randn(1, 2, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must lie"):
        metric.update(torch.zeros(1, 4, 4, dtype=torch.long), torch.full((1, 4, 4), 7))
    with pytest.raises(TypeError, match="targets"):
        metric.update(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="ignore_index"):
        SegmentationIoU(3, ignore_index=1)
