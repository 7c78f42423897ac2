import math

import pytest
import torch

from anchorlearn.metrics import (
    balanced_accuracy,
    classification_report,
    group_accuracy,
    per_class_accuracy,
    top1_accuracy,
)

# 6 samples of class 0 (5 right), 2 of class 1 (1 right), 2 of class 2 (0 right).
TARGETS = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2, 2])
PREDS = torch.tensor([0, 0, 0, 0, 0, 1, 1, 0, 0, 1])


def test_top1_from_labels_and_logits() -> None:
    assert top1_accuracy(PREDS, TARGETS) == pytest.approx(0.6)
    logits = torch.nn.functional.one_hot(PREDS, 3).float()
    assert top1_accuracy(logits, TARGETS) == pytest.approx(0.6)


def test_per_class_and_balanced_on_imbalanced_example() -> None:
    per_class = per_class_accuracy(PREDS, TARGETS, num_classes=4)
    torch.testing.assert_close(per_class[:3], torch.tensor([5 / 6, 0.5, 0.0], dtype=torch.float64))
    assert math.isnan(per_class[3])  # class 3 never occurs
    assert balanced_accuracy(PREDS, TARGETS, num_classes=4) == pytest.approx((5 / 6 + 0.5) / 3)


def test_group_accuracy_mapping_and_sequence() -> None:
    groups = {0: "many", 1: "few", 2: "few"}
    expected = {"many": 5 / 6, "few": 0.25}
    assert group_accuracy(PREDS, TARGETS, groups) == pytest.approx(expected)
    assert group_accuracy(PREDS, TARGETS, ["many", "few", "few"]) == pytest.approx(expected)


def test_report_keys() -> None:
    report = classification_report(PREDS, TARGETS, 3, ["many", "medium", "few"])
    assert set(report) == {"top1", "balanced_acc", "acc_many", "acc_medium", "acc_few"}
    assert report["acc_few"] == pytest.approx(0.0)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="targets"):
        top1_accuracy(PREDS, TARGETS[:3])
    with pytest.raises(TypeError, match="targets"):
        top1_accuracy(PREDS, TARGETS.float())
    with pytest.raises(ValueError, match="num_classes=5"):
        per_class_accuracy(torch.randn(10, 3), TARGETS, num_classes=5)
    with pytest.raises(ValueError, match="targets must lie"):
        per_class_accuracy(PREDS, TARGETS, num_classes=2)
    with pytest.raises(ValueError, match="class_to_group"):
        group_accuracy(PREDS, TARGETS, {0: "many", 1: "few"} | {5: "x"})
    with pytest.raises(TypeError, match="class_to_group"):
        group_accuracy(PREDS, TARGETS, "abc")
