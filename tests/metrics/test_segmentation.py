import math

import numpy as np
import pytest
import torch

from anchorlearn.metrics import SegmentationIoU, format_iou_table, mean_iou


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


def _numpy_metrics(preds: np.ndarray, targets: np.ndarray, num_classes: int, ignore: int):
    """Per-class IoU and accuracy by counting pixels class by class."""
    keep = targets != ignore
    p, t = preds[keep], targets[keep]
    iou, acc = np.full(num_classes, np.nan), np.full(num_classes, np.nan)
    for c in range(num_classes):
        inter = np.sum((p == c) & (t == c))
        union = np.sum((p == c) | (t == c))
        if union:
            iou[c] = inter / union
        if np.sum(t == c):
            acc[c] = inter / np.sum(t == c)
    return iou, acc, np.mean(p == t)


@pytest.mark.parametrize("num_classes", [4, 7, 150])
def test_matches_a_numpy_count_on_random_labels_with_ignore(num_classes: int) -> None:
    rng = np.random.default_rng(num_classes)
    # classes num_classes - 2 and - 1 never occur in the targets, the last not at all
    targets = rng.integers(0, num_classes - 2, size=(3, 24, 20))
    targets[rng.random(targets.shape) < 0.2] = 255
    preds = np.where(rng.random(targets.shape) < 0.6, targets, rng.integers(0, num_classes - 1))
    preds[targets == 255] = rng.integers(0, num_classes - 1, size=int((targets == 255).sum()))
    groups = np.array([("a", "b")[c % 2] for c in range(num_classes)])
    metric = SegmentationIoU(num_classes, class_to_group=list(groups))
    metric.update(torch.from_numpy(preds[:2]), torch.from_numpy(targets[:2]))
    metric.update(torch.from_numpy(preds[2:]), torch.from_numpy(targets[2:]))
    result = metric.compute()
    iou, acc, aacc = _numpy_metrics(preds, targets, num_classes, 255)
    np.testing.assert_allclose(result["iou"].numpy(), iou, rtol=1e-12)
    np.testing.assert_allclose(result["acc"].numpy(), acc, rtol=1e-12)
    assert math.isnan(result["acc"][-2]) and math.isnan(result["iou"][-1])
    assert result["aacc"] == pytest.approx(aacc, rel=1e-12)
    assert result["miou"] == pytest.approx(np.nanmean(iou), rel=1e-12)
    assert result["macc"] == pytest.approx(np.nanmean(acc), rel=1e-12)
    assert result["macc_b"] == pytest.approx(np.nanmean(acc[groups == "b"]), rel=1e-12)
    assert result["miou_a"] == pytest.approx(np.nanmean(iou[groups == "a"]), rel=1e-12)
    expected = np.zeros((num_classes, num_classes), dtype=np.int64)
    keep = targets != 255
    np.add.at(expected, (targets[keep], preds[keep]), 1)
    np.testing.assert_array_equal(metric.confusion.numpy(), expected)


def test_accuracy_of_known_confusion_and_empty_metric() -> None:
    target = torch.tensor([[[0, 0, 1, 1], [1, 2, 255, 255]]])
    pred = torch.tensor([[[0, 1, 1, 1], [0, 2, 3, 0]]])
    result = mean_iou(pred, target, num_classes=5)
    # class 0: 1 of 2 right; class 1: 2 of 3; class 2: 1 of 1; 3 and 4 not in the targets
    torch.testing.assert_close(result["acc"][:3], torch.tensor([0.5, 2 / 3, 1.0]).double())
    assert math.isnan(result["acc"][3]) and math.isnan(result["acc"][4])
    assert result["aacc"] == pytest.approx(4 / 6)
    assert result["macc"] == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)
    empty = SegmentationIoU(3).compute()
    assert math.isnan(empty["aacc"]) and math.isnan(empty["miou"]) and math.isnan(empty["macc"])


def test_ignore_index_none_counts_every_pixel_and_state_moves_and_resets() -> None:
    metric = SegmentationIoU(2, ignore_index=None).to(torch.float64)
    metric.update(torch.tensor([[[0, 1, 1]]]), torch.tensor([[[0, 0, 1]]]))
    assert metric.confusion.dtype == torch.long
    assert metric.confusion.tolist() == [[1, 1], [0, 1]]
    assert "confusion" not in metric.state_dict()
    metric.reset()
    assert metric.confusion.sum() == 0


def test_format_iou_table() -> None:
    target = torch.tensor([[[0, 0, 1, 1], [1, 2, 255, 255]]])
    pred = torch.tensor([[[0, 1, 1, 1], [0, 2, 3, 0]]])
    result = mean_iou(pred, target, num_classes=4)
    table = format_iou_table(["road", "sky", "car", "bicycle"], result)
    lines = table.splitlines()
    assert lines[0].split() == ["Class", "IoU", "Acc"]
    assert lines[2].split() == ["road", "33.33", "50.00"]
    assert lines[3].split() == ["sky", "50.00", "66.67"]
    assert lines[4].split() == ["car", "100.00", "100.00"]
    assert lines[5].split() == ["bicycle", "nan", "nan"]
    assert [line.split() for line in lines[-3:]] == [
        ["aAcc", "66.67"],
        ["mIoU", "61.11"],
        ["mAcc", "72.22"],
    ]
    # aligned: every row puts its numbers in the same columns
    assert len({len(line) for line in lines[2:6]}) == 1
    assert lines[2].index("33.33") + 5 == lines[4].index("100.00") + 6
    with pytest.raises(ValueError, match="class_names must have one name per class"):
        format_iou_table(["road"], result)
    with pytest.raises(ValueError, match="got no acc, macc, aacc"):
        format_iou_table(["a", "b"], {"iou": torch.zeros(2), "miou": 0.0})
    with pytest.raises(TypeError, match="class_names must be a sequence"):
        format_iou_table("road", result)
