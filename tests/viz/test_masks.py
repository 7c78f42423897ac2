from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anchorlearn.viz.masks import (
    colorize,
    default_palette,
    plot_segmentation_examples,
    save_mask_png,
)


def _voc_colour(index: int) -> tuple[int, int, int]:
    """Pascal VOC's colour of ``index``, one bit at a time."""
    r = g = b = 0
    for shift in range(8):
        r |= ((index >> (3 * shift)) & 1) << (7 - shift)
        g |= ((index >> (3 * shift + 1)) & 1) << (7 - shift)
        b |= ((index >> (3 * shift + 2)) & 1) << (7 - shift)
    return r, g, b


def test_default_palette_is_voc_and_distinct() -> None:
    palette = default_palette(256)
    assert palette.dtype == np.uint8 and palette.shape == (256, 3)
    assert palette[:5].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128]]
    assert palette[15].tolist() == [192, 128, 128]  # VOC's "person"
    assert [tuple(c) for c in palette.tolist()] == [_voc_colour(i) for i in range(256)]
    assert len({tuple(c) for c in default_palette(1000).tolist()}) == 1000
    assert np.array_equal(default_palette(7), palette[:7])
    with pytest.raises(ValueError, match="num_classes must be >= 1, got 0"):
        default_palette(0)


def test_colorize_maps_every_class_and_the_ignore_colour() -> None:
    palette = np.array([[10, 20, 30], [40, 50, 60], [70, 80, 90]], dtype=np.uint8)
    mask = torch.tensor([[0, 1, 2], [255, 2, 0]])
    rgb = colorize(mask, palette, ignore_color=(1, 2, 3))
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
    expected = [[[10, 20, 30], [40, 50, 60], [70, 80, 90]], [[1, 2, 3], [70, 80, 90], [10, 20, 30]]]
    assert rgb.tolist() == expected
    assert colorize(mask.numpy(), torch.from_numpy(palette))[1, 0].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match=r"mask must lie in \[0, 3\) \(palette"):
        colorize(mask, palette, ignore_index=None)


@pytest.mark.parametrize(
    ("mask", "palette", "kwargs", "error", "match"),
    [
        (np.zeros((2, 2), np.float32), default_palette(3), {}, TypeError, "mask must hold integer"),
        (np.zeros((1, 2, 2), np.int64), default_palette(3), {}, ValueError, r"mask must have .*"),
        (np.full((2, 2), 3), default_palette(3), {}, ValueError, r"or ignore_index=255.*e\.g\. 3"),
        (np.full((2, 2), -1), default_palette(3), {}, ValueError, "mask must lie in"),
        (np.zeros((2, 2), int), np.zeros((3, 3), np.int64), {}, TypeError, "palette must be uint8"),
        (np.zeros((2, 2), int), np.zeros((3, 4), np.uint8), {}, ValueError, r"palette must .*3\)"),
        (np.zeros((2, 2), int), [[0, 0, 0]], {}, TypeError, "palette must be a torch.Tensor"),
        (
            np.zeros((2, 2), int),
            default_palette(3),
            {"ignore_color": (0, 0, 256)},
            ValueError,
            "ignore_color must be three ints",
        ),
    ],
)
def test_colorize_bad_input(mask, palette, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        colorize(mask, palette, **kwargs)


def test_save_mask_png_round_trips(tmp_path: Path) -> None:
    palette = default_palette(21)
    mask = np.random.default_rng(0).integers(0, 21, size=(7, 9))
    mask[0, :3] = 255
    out = save_mask_png(tmp_path / "a" / "b" / "mask.png", mask, palette)
    assert out == tmp_path / "a" / "b" / "mask.png"
    with Image.open(out) as image:
        assert image.mode == "RGB" and image.size == (9, 7)
        back = np.asarray(image)
    assert np.array_equal(back, colorize(mask, palette))
    assert back[0, 0].tolist() == [0, 0, 0]


def test_save_mask_png_unwritable_folder_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match=r"cannot write the mask PNG .*file/sub/mask\.png"):
        save_mask_png(blocker / "sub" / "mask.png", np.zeros((2, 2), int), default_palette(2))


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def _examples(n: int, height: int, width: int, num_classes: int = 5):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, height, width, 3), dtype=np.uint8)
    truth = rng.integers(0, num_classes - 1, size=(n, height, width))
    truth[:, 0] = 255
    return images, truth, {"whole": truth.copy(), "slide": torch.from_numpy(truth[::-1].copy())}


def test_plot_segmentation_examples_writes_a_grid_of_the_image_aspect(tmp_path: Path) -> None:
    images, truth, predictions = _examples(3, 8, 16)
    names = ["road", "sky", "car", "tree", "bicycle"]
    out = plot_segmentation_examples(
        images, truth, predictions, default_palette(5), tmp_path / "f" / "ex.png", names, "val"
    )
    assert out == tmp_path / "f" / "ex.png" and out.read_bytes()[:4] == b"\x89PNG"
    width, height = _png_size(out)
    # 4 columns of 4 x 2 inch panels (W/H = 2) with 0.1 inch gaps, at 100 dpi
    assert abs(width - 100 * (4 * (4.0 + 0.1) + 0.1)) <= 1
    assert height >= 100 * 3 * 2.0
    square = plot_segmentation_examples(
        *_examples(3, 16, 16)[:3], default_palette(5), tmp_path / "square.png"
    )
    square_width, square_height = _png_size(square)
    assert abs(square_width - 100 * (4 * 2.1 + 0.1)) <= 1
    assert abs(square_height - (height - 40)) <= 1  # the title band is 0.4 inch
    one = plot_segmentation_examples(
        images[:1], truth[:1], {}, default_palette(5), tmp_path / "one.png"
    )
    one_width, one_height = _png_size(one)
    assert abs(one_width - 100 * (2 * 4.1 + 0.1)) <= 1
    assert one_height < height - 2 * 200


def test_plot_segmentation_examples_legend_lists_the_present_classes(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    seen = []
    original = Figure.legend

    def spy(self, *args, **kwargs):
        seen.extend((h.get_label(), h.get_facecolor()[:3]) for h in kwargs["handles"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "legend", spy)
    images, truth, predictions = _examples(2, 6, 6, num_classes=5)  # classes 0..3 occur
    predictions["whole"][0, 1, 1] = 4
    palette = default_palette(6)
    plot_segmentation_examples(
        images, truth, predictions, palette, tmp_path / "x.png", list("abcdef")
    )
    assert [label for label, _ in seen] == ["a", "b", "c", "d", "e", "ignored"]
    assert np.allclose([colour for _, colour in seen[:5]], palette[:5] / 255.0)
    assert np.allclose(seen[5][1], (0, 0, 0))


def test_plot_segmentation_examples_bad_input(tmp_path: Path) -> None:
    images, truth, predictions = _examples(2, 6, 6)
    palette = default_palette(5)
    path = tmp_path / "x.png"
    with pytest.raises(ValueError, match=r"images must be uint8 RGB \(N, H, W, 3\)"):
        plot_segmentation_examples(images[..., 0], truth, predictions, palette, path)
    with pytest.raises(ValueError, match=r"predictions\['whole'\] must have the shape"):
        plot_segmentation_examples(images, truth, {"whole": truth[:1]}, palette, path)
    with pytest.raises(ValueError, match=r"ground_truth must lie in \[0, 3\)"):
        plot_segmentation_examples(images, truth, {}, default_palette(3), path)
    with pytest.raises(TypeError, match=r"ground_truth must hold integer"):
        plot_segmentation_examples(images, truth.astype(float), {}, palette, path)
    with pytest.raises(ValueError, match="class_names must have one name per palette colour"):
        plot_segmentation_examples(images, truth, {}, palette, path, ["a"])
    with pytest.raises(ValueError, match="must not use the column names"):
        plot_segmentation_examples(images, truth, {"image": truth}, palette, path)
    with pytest.raises(TypeError, match="predictions must be a mapping"):
        plot_segmentation_examples(images, truth, [truth], palette, path)
    with pytest.raises(ValueError, match="images must be non-empty"):
        plot_segmentation_examples(images[:0], truth[:0], {}, palette, path)
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match=r"cannot write the figure .*file/x\.png"):
        plot_segmentation_examples(images, truth, {}, palette, tmp_path / "file" / "x.png")
    assert not path.exists()
