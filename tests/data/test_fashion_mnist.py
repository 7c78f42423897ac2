import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from anchorlearn.data import fashion_mnist as fm


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_fake_fashion(directory: Path, n: int = 5, gz: bool = True) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    for prefix in ("train", "t10k"):
        for stem, array in (
            (f"{prefix}-images-idx3-ubyte", images),
            (f"{prefix}-labels-idx1-ubyte", labels),
        ):
            data = idx_bytes(array)
            if gz:
                (directory / f"{stem}.gz").write_bytes(gzip.compress(data))
            else:
                (directory / stem).write_bytes(data)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_uint8(tmp_path, gz):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    data = idx_bytes(array)
    path = tmp_path / "x.idx"
    path.write_bytes(gzip.compress(data) if gz else data)
    out = fm.read_idx(path)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, array)


def test_read_idx_truncated_gzip_names_the_file(tmp_path):
    data = gzip.compress(idx_bytes(np.arange(5000, dtype=np.uint8).reshape(50, 100)))
    path = tmp_path / "cut.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.gz: corrupt or truncated gzip file"):
        fm.read_idx(path)


def test_read_idx_handmade_bytes(tmp_path):
    # magic 00 00 08 01, one dimension of size 3, data 7 8 9
    path = tmp_path / "labels"
    path.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x03\x07\x08\x09")
    np.testing.assert_array_equal(fm.read_idx(path), [7, 8, 9])


def test_read_idx_big_endian_int32(tmp_path):
    array = np.array([[1, -2], [300000, 4]], dtype=np.int32)
    path = tmp_path / "ints"
    path.write_bytes(idx_bytes(array, 0x0C))
    np.testing.assert_array_equal(fm.read_idx(path), array)


def test_read_idx_bad_magic(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match=r"bad.*not an IDX file.*12 34 08 01"):
        fm.read_idx(path)


def test_read_idx_unknown_type_and_bad_length(tmp_path):
    path = tmp_path / "t"
    path.write_bytes(b"\x00\x00\x07\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match=r"unknown IDX type code.*0x07"):
        fm.read_idx(path)
    path.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x00")
    with pytest.raises(ValueError, match=r"expected 5 bytes, got 1"):
        fm.read_idx(path)


def test_read_idx_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothere"):
        fm.read_idx(tmp_path / "nothere")


@pytest.mark.parametrize("gz", [False, True])
def test_load_from_root(tmp_path, gz):
    write_fake_fashion(tmp_path, n=5, gz=gz)
    images, labels = fm.load_fashion_mnist("test", root=tmp_path)
    assert images.shape == (5, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and labels.tolist() == [0, 1, 2, 3, 4]
    assert not images.flags.writeable
    assert fm.load_fashion_mnist("test", root=tmp_path)[0] is images  # cached


def test_env_dir_is_searched(tmp_path, monkeypatch):
    (tmp_path / "fashion-mnist").mkdir()
    write_fake_fashion(tmp_path / "fashion-mnist", n=3)
    monkeypatch.setenv("ANCHORLEARN_DATA", str(tmp_path))
    assert fm.load_fashion_mnist("train")[0].shape == (3, 28, 28)


def test_both_splits_come_from_one_directory(tmp_path, monkeypatch):
    # $ANCHORLEARN_DATA holds the training files only: its test split must not be taken
    # from the next directory searched, a different copy
    partial, full = tmp_path / "env" / "fashion-mnist", tmp_path / "system" / "fashion-mnist"
    partial.mkdir(parents=True)
    full.mkdir(parents=True)
    write_fake_fashion(partial, n=3)
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (partial / f"{stem}.gz").unlink()
    write_fake_fashion(full, n=4)
    monkeypatch.setenv("ANCHORLEARN_DATA", str(tmp_path / "env"))
    monkeypatch.setattr(fm, "SYSTEM_DIR", full)
    assert fm.find_fashion_mnist("train")[0].parent == full
    assert fm.find_fashion_mnist("test")[0].parent == full


def test_missing_names_every_place(tmp_path, monkeypatch):
    monkeypatch.setenv("ANCHORLEARN_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "system" / "fashion-mnist")
    with pytest.raises(FileNotFoundError) as info:
        fm.load_fashion_mnist("train")
    message = str(info.value)
    assert str(tmp_path / "env" / "fashion-mnist") in message
    assert str(tmp_path / "system" / "fashion-mnist") in message
    assert str(tmp_path / "cache" / "anchorlearn" / "debian") in message
    assert "make data" in message and "scripts/install_data.sh" in message
    assert "ANCHORLEARN_DATA" in message
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty")):
        fm.load_fashion_mnist("test", root=tmp_path / "empty")


def test_bad_split():
    with pytest.raises(ValueError, match=r"split must be 'train' or 'test', got 'val'"):
        fm.load_fashion_mnist("val")


def test_real_fashion_mnist():
    try:
        images, labels = fm.load_fashion_mnist("test")
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST not installed (make data)")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10
    assert len(fm.FASHION_MNIST_CLASSES) == 10
