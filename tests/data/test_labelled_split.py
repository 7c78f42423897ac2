"""labelled_split: the labelled / unlabelled parts of semi-supervised training."""

from __future__ import annotations

import numpy as np
import pytest

from anchorlearn.data.splits import labelled_split, stratified_split

LABELS = np.repeat(np.arange(4), [50, 31, 12, 7])


def test_the_split_is_stratified_disjoint_and_complete() -> None:
    labelled, unlabelled = labelled_split(LABELS, 0.2, seed=0)
    assert labelled.dtype == unlabelled.dtype == np.int64
    assert np.intersect1d(labelled, unlabelled).size == 0
    assert np.array_equal(np.sort(np.concatenate([labelled, unlabelled])), np.arange(len(LABELS)))
    assert np.bincount(LABELS[labelled]).tolist() == [10, 6, 2, 1]  # round(0.2 * n_c)
    assert np.all(np.diff(labelled) > 0) and np.all(np.diff(unlabelled) > 0)


def test_the_split_is_reproducible_and_depends_on_the_seed() -> None:
    a = labelled_split(LABELS, 0.3, seed=4)
    b = labelled_split(LABELS, 0.3, seed=4)
    c = labelled_split(LABELS, 0.3, seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c[0])


def test_the_draw_is_not_the_one_of_stratified_split_with_the_same_seed() -> None:
    labels = np.zeros(1000, dtype=np.int64)
    labelled, _ = labelled_split(labels, 0.1, seed=0)
    _, held = stratified_split(labels, 0.1, seed=0)
    assert len(labelled) == len(held) == 100
    assert not np.array_equal(labelled, held)


def test_fraction_one_labels_everything() -> None:
    labelled, unlabelled = labelled_split(LABELS, 1.0)
    assert np.array_equal(labelled, np.arange(len(LABELS))) and unlabelled.size == 0


def test_a_class_left_without_a_label_is_an_error_naming_it_and_the_key() -> None:
    names = ["a", "b", "c", "d"]
    with pytest.raises(ValueError) as info:
        labelled_split(LABELS, 0.04, name="data.labelled_fraction", class_names=names)
    message = str(info.value)
    assert message.startswith("data.labelled_fraction=0.04 leaves 2 class(es) without a label")
    assert "c (12 images), d (7 images)" in message
    assert "raise data.labelled_fraction above 0.0714" in message  # 0.5 / 7


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, True])
def test_fraction_out_of_range(fraction: float) -> None:
    with pytest.raises(ValueError, match=r"fraction must lie in \(0, 1\]"):
        labelled_split(LABELS, fraction)
