import json

import numpy as np
import pytest

from anchorlearn.data.long_tail import (
    long_tailed_counts,
    long_tailed_indices,
    shot_groups,
    write_class_counts,
)

IR10 = [6000, 4645, 3596, 2784, 2156, 1669, 1292, 1000, 774, 600]
IR100 = [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]


def test_exp_counts_exact():
    assert long_tailed_counts(6000, 10, 10) == IR10
    assert long_tailed_counts(6000, 10, 100) == IR100
    assert sum(IR100) == 14886


def test_step_counts():
    assert long_tailed_counts(6000, 10, 100, "step") == [6000] * 5 + [60] * 5
    assert long_tailed_counts(6000, 10, 1) == [6000] * 10


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"imbalance_ratio": 0.5}, "imbalance_ratio must be >= 1, got 0.5"),
        ({"profile": "linear"}, "profile must be one of .*got 'linear'"),
        ({"n_max": 0}, "n_max must be an int >= 1, got 0"),
        ({"num_classes": 0}, "num_classes must be an int >= 1, got 0"),
    ],
)
def test_counts_errors(kwargs, match):
    args = {"n_max": 100, "num_classes": 10, "imbalance_ratio": 10} | kwargs
    with pytest.raises(ValueError, match=match):
        long_tailed_counts(**args)


def test_indices_follow_profile_and_seed():
    labels = np.repeat(np.arange(10), 600)
    idx = long_tailed_indices(labels, 100, seed=3)
    counts = np.bincount(labels[idx], minlength=10)
    assert sorted(counts.tolist(), reverse=True) == long_tailed_counts(600, 10, 100)
    np.testing.assert_array_equal(idx, long_tailed_indices(labels, 100, seed=3))
    other = long_tailed_indices(labels, 100, seed=4)
    assert not np.array_equal(idx, other)
    assert np.all(np.diff(idx) > 0)


def test_indices_ir_one_keeps_all():
    labels = np.array([0, 1, 1, 2])
    np.testing.assert_array_equal(long_tailed_indices(labels, 1), np.arange(4))


def test_indices_bad_labels():
    with pytest.raises(TypeError, match=r"labels must be a 1-D integer array"):
        long_tailed_indices(np.zeros(3), 10)


def test_shot_groups_thirds():
    groups = shot_groups(IR100)
    assert [c for c, g in groups.items() if g == "many"] == [0, 1, 2, 3]
    assert [c for c, g in groups.items() if g == "medium"] == [4, 5, 6]
    assert [c for c, g in groups.items() if g == "few"] == [7, 8, 9]
    shuffled = {3: 10, 0: 50, 1: 5}
    assert shot_groups(shuffled) == {0: "many", 1: "few", 3: "medium"}


def test_shot_groups_thresholds():
    groups = shot_groups(IR100, many_thresh=100, few_thresh=20)
    assert groups[8] == "medium" and groups[7] == "many" and groups[9] == "medium"
    assert shot_groups([500, 50, 10], many_thresh=100, few_thresh=20) == {
        0: "many",
        1: "medium",
        2: "few",
    }
    with pytest.raises(ValueError, match=r"given together"):
        shot_groups([1, 2], many_thresh=100)


def test_write_class_counts(tmp_path):
    path = write_class_counts(tmp_path / "sub" / "counts.json", [3, 1], ["a", "b"])
    assert json.loads(path.read_text()) == {
        "counts": {"0": 3, "1": 1},
        "total": 4,
        "class_names": ["a", "b"],
    }
    with pytest.raises(ValueError, match=r"expected at least 2 names, got 1"):
        write_class_counts(tmp_path / "x.json", [3, 1], ["a"])
