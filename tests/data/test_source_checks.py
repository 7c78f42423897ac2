"""Users' data that used to load into a silently wrong result or a raw traceback: stray mask
values in a segmentation folder, and an ``.npz`` header that claims a huge array."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anchorlearn.data.sources import load_npz_classification, load_segmentation_folder


def seg_folder(root: Path, masks: list[np.ndarray]) -> Path:
    """``images/i.png`` (grey) and ``masks/i.png`` for each mask."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, mask in enumerate(masks):
        Image.fromarray(np.full(mask.shape, 9 * i, np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / f"{i}.png")
    return root


def three_class_masks(n: int = 5) -> list[np.ndarray]:
    """Masks of classes 0, 1, 2 in stripes, with an ignore (255) corner."""
    masks = []
    for _ in range(n):
        mask = np.repeat(np.arange(3, dtype=np.uint8), 2)[None, :].repeat(4, axis=0)
        mask[0, 0] = 255
        masks.append(mask)
    return masks


def test_a_stray_mask_value_is_refused_naming_it_its_pixels_and_files(tmp_path: Path) -> None:
    masks = three_class_masks()
    for i in (1, 3):
        masks[i][2, 3] = 200
    masks[3][3, 3] = 200
    root = seg_folder(tmp_path / "seg", masks)
    with pytest.raises(ValueError) as info:
        load_segmentation_folder(root)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{root / 'masks'}: mask value 200 (3 pixels, in 1.png, 3.png)")
    assert "0..200" in message and "only 4 of them occur" in message
    assert f"add {root / 'classes.txt'}" in message and "fix the masks" in message


def test_stray_values_name_at_most_three_files(tmp_path: Path) -> None:
    masks = three_class_masks(6)
    for i, value in enumerate((60, 61, 60, 60, 60, 60)):
        masks[i][3, 5] = value
    root = seg_folder(tmp_path / "seg", masks)
    with pytest.raises(
        ValueError,
        match=r"mask values 60, 61 \(6 pixels, in 0\.png, 1\.png, "
        r"2\.png and 3 more\)",
    ):
        load_segmentation_folder(root)


def test_classes_txt_accepts_the_value_the_inference_refuses(tmp_path: Path) -> None:
    masks = three_class_masks()
    masks[1][2, 3] = 200
    root = seg_folder(tmp_path / "seg", masks)
    (root / "classes.txt").write_text("\n".join(f"c{i}" for i in range(201)) + "\n")
    data = load_segmentation_folder(root)
    assert data.num_classes == 201 and int(data.masks.max()) == 255


@pytest.mark.parametrize(
    ("values", "num_classes"),
    [
        ((0, 1, 2), 3),
        ((1, 2, 3), 4),  # labels from 1: class 0 never occurs, within the tolerance
        ((0, 1, 2, 5), 6),  # 4 of 6 classes occur
        ((0, 1, 2, 3, 7), 8),  # 5 of 8 (v < 2 * 5 for every value)
    ],
)
def test_small_gaps_are_tolerated(tmp_path: Path, values, num_classes: int) -> None:
    masks = [np.full((4, 6), v, np.uint8) for v in values]
    masks[0][0, 0] = 255  # the ignore value is never a class
    data = load_segmentation_folder(seg_folder(tmp_path / "seg", masks))
    assert data.class_names == [str(c) for c in range(num_classes)]


def test_the_tolerance_is_fewer_than_half_of_the_classes(tmp_path: Path) -> None:
    # 4 distinct values: anything >= 8 leaves fewer than half of 0..max occupied
    masks = [np.full((4, 6), v, np.uint8) for v in (0, 1, 2, 8)]
    with pytest.raises(ValueError, match=r"mask value 8 \(24 pixels, in 3\.png\)"):
        load_segmentation_folder(seg_folder(tmp_path / "seg", masks))


# ---------------------------------------------------------------- npz headers


def npy_bytes(shape: tuple[int, ...], dtype: str, payload: bytes) -> bytes:
    """A ``.npy`` member whose header claims ``shape`` but holds only ``payload``."""
    out = io.BytesIO()
    header = {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(out, header)
    return out.getvalue() + payload


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_an_npz_header_claiming_a_huge_array_is_refused_before_loading(
    tmp_path: Path, compression: int
) -> None:
    path = tmp_path / "crafted.npz"
    huge = (128_000, 1000, 1000)  # 119 GiB of uint8
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        zf.writestr("images.npy", npy_bytes(huge, "u1", bytes(64)))
        zf.writestr("labels.npy", npy_bytes((4,), "<i8", np.arange(4).tobytes()))
    with pytest.raises(ValueError) as info:
        load_npz_classification(path)
    message = str(info.value)
    assert message.startswith(f"{path}: array 'images' claims shape (128000, 1000, 1000)")
    assert "119.2 GiB" in message and "64 bytes" in message and "\n" not in message


def test_a_header_claiming_a_little_more_than_its_data_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "short.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("images.npy", npy_bytes((4, 6, 6), "u1", bytes(4 * 36)))
        zf.writestr("labels.npy", npy_bytes((4,), "<i8", np.arange(3).tobytes()))
    with pytest.raises(ValueError, match=r"short\.npz: array 'labels' claims shape \(4,\)"):
        load_npz_classification(path)


def test_ordinary_and_compressed_npz_files_still_load(tmp_path: Path) -> None:
    images = np.arange(4 * 36, dtype=np.uint8).reshape(4, 6, 6)
    labels = np.array([0, 1, 1, 0])
    for save in (np.savez, np.savez_compressed):
        path = tmp_path / f"{save.__name__}.npz"
        save(path, images=images, labels=labels, class_names=np.array(["a", "b"]))
        data = load_npz_classification(path)
        assert np.array_equal(data.images, images) and data.labels.tolist() == [0, 1, 1, 0]
        assert data.class_names == ["a", "b"]
