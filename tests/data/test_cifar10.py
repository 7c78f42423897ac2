"""The ``cifar10:ROOT`` source: both layouts, the checks, and the real data when present."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from tests.data.cifarfixtures import cifar_arrays, make_cifar_batches, make_cifar_folders

from anchorlearn.data.cifar import CIFAR10_CLASSES, load_cifar10
from anchorlearn.data.sources import load_classification_source

REAL = Path(__file__).parents[2].parent / "shared" / "data" / "cifar10"


@pytest.mark.parametrize("nested", [True, False])
def test_python_batches_are_read_into_hwc_rgb_with_the_official_plane_order(
    tmp_path: Path, nested: bool
) -> None:
    root = make_cifar_batches(tmp_path, per_class=2, nested=nested)
    train, test = load_cifar10(root)
    assert train.images.shape == (5 * 20, 32, 32, 3) and train.images.dtype == np.uint8
    assert test.images.shape == (20, 32, 32, 3)
    assert train.class_names == test.class_names == list(CIFAR10_CLASSES)
    # data_batch_1 comes first and its rows keep their order, with R, G, B planes -> HWC
    first, labels = cifar_arrays(2, seed=1)
    np.testing.assert_array_equal(train.images[:20], first)
    np.testing.assert_array_equal(train.labels[:20], labels)
    np.testing.assert_array_equal(test.images, cifar_arrays(2, seed=0)[0])
    assert train.labels.dtype == np.int64 and np.bincount(train.labels).tolist() == [10] * 10


def test_class_folders_are_read_with_the_same_classes_in_both_splits(tmp_path: Path) -> None:
    root = make_cifar_folders(tmp_path, per_class=2, test_per_class=1)
    train, test = load_classification_source(f"cifar10:{root}")
    assert train.images.shape == (20, 32, 32, 3) and test.images.shape == (10, 32, 32, 3)
    assert train.class_names == sorted(CIFAR10_CLASSES)
    images, labels = cifar_arrays(2, seed=1)
    np.testing.assert_array_equal(train.images, images)  # class-major in both
    np.testing.assert_array_equal(train.labels, labels)


def test_class_folders_that_differ_between_splits_are_refused(tmp_path: Path) -> None:
    root = make_cifar_folders(tmp_path, per_class=1, test_per_class=1)
    (root / "test" / "truck").rename(root / "test" / "lorry")
    with pytest.raises(ValueError, match=r"class folders of train/.*and test/.*differ"):
        load_cifar10(root)


def test_a_root_with_neither_layout_names_both(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match=r"data_batch_1\.\.5.*train.*test"):
        load_cifar10(tmp_path)
    with pytest.raises(FileNotFoundError, match="CIFAR-10 folder not found"):
        load_cifar10(tmp_path / "missing")


def test_a_missing_batch_is_named(tmp_path: Path) -> None:
    root = make_cifar_batches(tmp_path, per_class=1)
    (root / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_4"):
        load_cifar10(root)


class _Payload:
    """Unpickling this runs ``os.getcwd``: a stand-in for code hidden in a data file."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_a_batch_that_would_run_code_is_refused(tmp_path: Path) -> None:
    root = make_cifar_batches(tmp_path, per_class=1)
    with (root / "cifar-10-batches-py" / "test_batch").open("wb") as f:
        pickle.dump({b"data": _Payload(), b"labels": [0]}, f, protocol=2)
    with pytest.raises(ValueError, match=r"test_batch: not a CIFAR-10 python batch.*posix\.getcwd"):
        load_cifar10(root)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({b"labels": [0]}, r"missing \['data'\]"),
        ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, r"uint8 \(N, 3072\)"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "'labels' must be 2 integers"),
        ({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}, "labels must be in 0..9"),
        ([1, 2], "a list"),
    ],
)
def test_malformed_batches_are_named(tmp_path: Path, payload: object, message: str) -> None:
    root = make_cifar_batches(tmp_path, per_class=1)
    path = root / "cifar-10-batches-py" / "test_batch"
    with path.open("wb") as f:
        pickle.dump(payload, f, protocol=2)
    with pytest.raises(ValueError, match=message) as info:
        load_cifar10(root)
    assert "test_batch" in str(info.value)


def test_a_file_that_is_no_pickle_is_named(tmp_path: Path) -> None:
    root = make_cifar_batches(tmp_path, per_class=1)
    (root / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"\x89PNG not a batch")
    with pytest.raises(ValueError, match="data_batch_2: not a CIFAR-10 python batch"):
        load_cifar10(root)


def test_the_source_name_is_listed_in_the_error_for_an_unknown_source() -> None:
    with pytest.raises(ValueError, match="'cifar10:ROOT'"):
        load_classification_source("cifar10")


@pytest.mark.slow  # reads 60,000 JPEG files: about 30 s
@pytest.mark.skipif(not REAL.is_dir(), reason="the real CIFAR-10 folders are not at hand")
def test_the_real_data_set_has_its_published_size() -> None:
    train, test = load_cifar10(REAL)
    assert train.images.shape == (50000, 32, 32, 3) and test.images.shape == (10000, 32, 32, 3)
    assert np.bincount(train.labels).tolist() == [5000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert train.class_names == list(CIFAR10_CLASSES)


class _ObjectFieldDtype:
    """Pickles as a structured dtype with an object field whose flags claim it holds none:
    numpy itself would accept that state and then read raw bytes as object pointers."""

    def __reduce__(self):
        state = (3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 0)
        return (np.dtype, ("V8", False, True), state)


class _ArrayOfThatDtype:
    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct

        return (
            _reconstruct,
            (np.ndarray, (0,), b"b"),
            (1, (1,), _ObjectFieldDtype(), False, b"A" * 8),
        )


def test_a_crafted_array_state_is_refused_without_touching_its_bytes(tmp_path: Path) -> None:
    root = make_cifar_batches(tmp_path, per_class=1)
    with (root / "cifar-10-batches-py" / "batches.meta").open("wb") as f:
        pickle.dump({b"label_names": [_ArrayOfThatDtype()]}, f, protocol=2)
    with pytest.raises(ValueError, match=r"batches\.meta: not a CIFAR-10 python batch"):
        load_cifar10(root)


def test_arrays_of_objects_are_refused(tmp_path: Path) -> None:
    root = make_cifar_batches(tmp_path, per_class=1)
    payload = {b"data": np.array([object()] * 3072, dtype=object).reshape(1, -1), b"labels": [0]}
    with (root / "cifar-10-batches-py" / "test_batch").open("wb") as f:
        pickle.dump(payload, f, protocol=2)
    with pytest.raises(ValueError, match="test_batch: not a CIFAR-10 python batch"):
        load_cifar10(root)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_re_pickled_copies_load_with_any_protocol(tmp_path: Path, protocol: int) -> None:
    root = make_cifar_batches(tmp_path, per_class=1)
    path = root / "cifar-10-batches-py" / "test_batch"
    images, labels = cifar_arrays(1, seed=7)
    data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    big_endian_labels = labels.astype(">i8")  # byte order kept through the state
    with path.open("wb") as f:
        pickle.dump({"data": data, "labels": big_endian_labels}, f, protocol=protocol)
    _, test = load_cifar10(root)
    np.testing.assert_array_equal(test.images, images)
    np.testing.assert_array_equal(test.labels, labels)
