from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anchorlearn.data.sources import (
    load_classification_source,
    load_digits_data,
    load_image_folder,
    load_npz_classification,
    load_segmentation_folder,
)


def save_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def good_images(n: int = 4) -> np.ndarray:
    return np.zeros((n, 6, 6), dtype=np.uint8)


def test_npz_ok(tmp_path):
    path = save_npz(
        tmp_path / "d.npz",
        images=np.zeros((3, 5, 5, 3), np.uint8),
        labels=np.array([0, 1, 1]),
        class_names=np.array(["cat", "dog"]),
    )
    data = load_npz_classification(path)
    assert data.images.shape == (3, 5, 5, 3)
    assert data.labels.dtype == np.int64
    assert data.class_names == ["cat", "dog"] and data.num_classes == 2


@pytest.mark.parametrize(
    ("arrays", "error", "match"),
    [
        ({"images": good_images()}, ValueError, r"missing array\(s\) \['labels'\]"),
        (
            {"images": good_images().astype(np.float32), "labels": np.arange(4)},
            ValueError,
            "'images' must have dtype uint8, got float32",
        ),
        (
            {"images": good_images(), "labels": np.arange(4.0)},
            ValueError,
            "'labels' must have an integer dtype, got float64",
        ),
        (
            {"images": np.zeros((4, 6), np.uint8), "labels": np.arange(4)},
            ValueError,
            r"'images' must have shape \(N, H, W\) or \(N, H, W, C\), got \(4, 6\)",
        ),
        (
            {"images": good_images(), "labels": np.arange(3)},
            ValueError,
            "lengths differ: 4 images, 3 labels",
        ),
        (
            {"images": good_images(), "labels": np.array([0, 1, -1, 1])},
            ValueError,
            "labels must be >= 0, got -1 at index 2",
        ),
        (
            {
                "images": good_images(),
                "labels": np.array([0, 1, 2, 1]),
                "class_names": np.array(["a", "b"]),
            },
            ValueError,
            "labels must be < 2 .* got 2 at index 2",
        ),
        (
            {"images": good_images(), "labels": np.array([0, 2, 2, 0])},
            ValueError,
            r"classes \[1\] are empty",
        ),
        (
            {"images": good_images(), "labels": np.array([True, False, True, False])},
            ValueError,
            "'labels' must have an integer dtype, got bool",
        ),
        (
            {"images": np.zeros((4, 3, 5, 5), np.uint8), "labels": np.arange(4)},
            ValueError,
            r"C in \(1, 3, 4\), got shape \(4, 3, 5, 5\) \(it looks like \(N, C, H, W\)",
        ),
        (
            {
                "images": good_images(),
                "labels": np.array([0, 1, 2, 1]),
                "class_names": np.array(["even", "odd", "even"]),
            },
            ValueError,
            "class_names must be distinct, 'even' repeats",
        ),
    ],
)
def test_npz_errors(tmp_path, arrays, error, match):
    path = save_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(error, match=match) as info:
        load_npz_classification(path)
    assert "bad.npz" in str(info.value)


@pytest.mark.parametrize(
    "content",
    [b"", b"not a zip archive", b"PK\x03\x04 cut short", "npy", "objects"],
)
def test_unreadable_npz_is_one_value_error_naming_the_file(tmp_path, content):
    path = tmp_path / "bad.npz"
    if content == "npy":  # a bare .npy array renamed
        with path.open("wb") as fh:
            np.save(fh, good_images())
    elif content == "objects":
        np.savez(path, images=np.array([None, 1], dtype=object), labels=np.arange(2))
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=r"bad\.npz: not a readable \.npz archive"):
        load_npz_classification(path)


def test_npz_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"npz file not found: .*nope.npz"):
        load_npz_classification(tmp_path / "nope.npz")


def write_png(path: Path, size: tuple[int, int] = (6, 5), mode: str = "L", value: int = 7) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size[1], size[0]), value).save(path)


def test_image_folder_ok(tmp_path):
    write_png(tmp_path / "b_dog" / "1.png")
    write_png(tmp_path / "a_cat" / "1.png")
    write_png(tmp_path / "a_cat" / "2.png", value=9)
    data = load_image_folder(tmp_path)
    assert data.class_names == ["a_cat", "b_dog"]
    assert data.images.shape == (3, 6, 5) and data.images.dtype == np.uint8
    assert data.labels.tolist() == [0, 0, 1]
    write_png(tmp_path / "b_dog" / "2.png", size=(9, 9), mode="RGB", value=3)
    resized = load_image_folder(tmp_path, resize=4)
    assert resized.images.shape == (4, 4, 4, 3)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"image folder not found"):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"expected one sub-folder per class, got none"):
        load_image_folder(tmp_path)
    write_png(tmp_path / "a" / "1.png")
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match=r"[/\\]b: empty class"):
        load_image_folder(tmp_path)
    write_png(tmp_path / "b" / "1.png", size=(8, 8))
    with pytest.raises(ValueError, match=r"b[/\\]1.png: image size 8x8 differs .*resize="):
        load_image_folder(tmp_path)
    (tmp_path / "b" / "2.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"2.png: cannot be read as an image"):
        load_image_folder(tmp_path, resize=4)
    with pytest.raises(TypeError, match=r"resize must be None, an int or"):
        load_image_folder(tmp_path, resize="big")


def test_sixteen_bit_images_are_refused_not_clipped(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.fromarray(np.full((5, 6), 4000, dtype=np.uint16)).save(tmp_path / cls / "1.png")
    with pytest.raises(ValueError, match=r"1\.png: image mode 'I;16' is not 8-bit"):
        load_image_folder(tmp_path)


def make_seg_folder(root: Path, n: int = 3, size: tuple[int, int] = (6, 6)) -> None:
    for i in range(n):
        write_png(root / "images" / f"{i}.png", size=size, mode="RGB", value=i)
        mask = np.full(size, i % 3, dtype=np.uint8)
        mask[0, 0] = 255
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")


def test_segmentation_folder_ok(tmp_path):
    make_seg_folder(tmp_path)
    data = load_segmentation_folder(tmp_path)
    assert data.images.shape == (3, 6, 6, 3) and data.masks.shape == (3, 6, 6)
    assert data.class_names == ["0", "1", "2"]
    assert data.masks[0, 0, 0] == 255
    (tmp_path / "classes.txt").write_text("sky\nroad\ncar\nperson\n")
    resized = load_segmentation_folder(tmp_path, resize=(3, 4))
    assert resized.masks.shape == (3, 3, 4)
    assert set(np.unique(resized.masks)) <= {0, 1, 2, 255}
    assert resized.class_names == ["sky", "road", "car", "person"]


def test_segmentation_folder_errors(tmp_path):
    make_seg_folder(tmp_path)
    (tmp_path / "classes.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"2.png: mask values must be < 2 .* got 2"):
        load_segmentation_folder(tmp_path)
    (tmp_path / "classes.txt").unlink()
    (tmp_path / "masks" / "1.png").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"missing mask for .*1.png: expected .*masks.1.png"
    ):
        load_segmentation_folder(tmp_path)
    Image.new("RGB", (6, 6)).save(tmp_path / "masks" / "1.png")
    with pytest.raises(ValueError, match=r"1.png: a mask must be a single-channel PNG"):
        load_segmentation_folder(tmp_path)
    Image.new("L", (5, 6)).save(tmp_path / "masks" / "1.png")
    with pytest.raises(ValueError, match=r"1.png: mask size 6x5 differs from its image"):
        load_segmentation_folder(tmp_path)
    Image.new("L", (6, 6)).save(tmp_path / "masks" / "1.png")
    Image.new("L", (6, 6)).save(tmp_path / "masks" / "extra.png")
    with pytest.raises(ValueError, match=r"masks without an image .*\['extra.png'\]"):
        load_segmentation_folder(tmp_path)
    (tmp_path / "masks" / "extra.png").unlink()
    write_png(tmp_path / "images" / "3.png", size=(7, 7), mode="RGB")
    Image.new("L", (7, 7)).save(tmp_path / "masks" / "3.png")
    with pytest.raises(ValueError, match=r"3.png: image size 7x7 differs"):
        load_segmentation_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"images folder not found: .*images.images"):
        load_segmentation_folder(tmp_path / "images")


def test_digits_and_sources():
    data = load_digits_data()
    assert data.images.shape == (1797, 8, 8) and data.images.dtype == np.uint8
    assert data.images.max() == 255
    train, test = load_classification_source("digits")
    assert test is None and train.num_classes == 10
    with pytest.raises(ValueError, match=r"source must be .* got 'cifar'"):
        load_classification_source("cifar")
