import hashlib
import subprocess
import sys

import numpy as np
import pytest

from anchorlearn.data.long_tail import profile_weights
from anchorlearn.data.scenes import (
    ItemPlacement,
    make_scenes,
    render_scene,
    scene_class_order,
)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ANCHORLEARN_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def fashion():
    from anchorlearn.data.fashion_mnist import load_fashion_mnist

    try:
        return load_fashion_mnist("train")
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST not installed (make data)")


def test_render_matches_pasted_pixels():
    background = np.full((16, 16, 3), 10, dtype=np.uint8)
    item_a = np.zeros((6, 6), np.uint8)
    item_a[1:5, 1:5] = 200
    item_b = np.zeros((4, 4), np.uint8)
    item_b[:, :2] = 100
    placements = [
        ItemPlacement(item_a, class_index=2, top=2, left=2),
        ItemPlacement(item_b, class_index=7, top=4, left=4, tint=(1.0, 0.5, 0.0)),
    ]
    image, mask = render_scene(background, placements, threshold=30, ignore_border=False)
    expected = np.zeros((16, 16), np.uint8)
    expected[3:7, 3:7] = 3
    expected[4:8, 4:6] = 8
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(image[mask == 0], 10)
    np.testing.assert_array_equal(image[mask == 3], [[200, 200, 200]] * int((mask == 3).sum()))
    np.testing.assert_array_equal(image[mask == 8], [[100, 50, 0]] * 8)

    _, bordered = render_scene(background, placements, threshold=30, ignore_border=True)
    edge = bordered == 255
    assert edge.sum() > 0
    np.testing.assert_array_equal(bordered[~edge], expected[~edge])
    assert np.all(expected[edge] > 0)  # the band lies on item pixels
    assert bordered[5, 5] == 255 and bordered[3, 3] == 255 and bordered[4, 3] == 255


def test_render_rejects_outside():
    with pytest.raises(ValueError, match=r"placements\[0\]: item of size 6x6 .* inside"):
        render_scene(
            np.zeros((8, 8, 3), np.uint8), [ItemPlacement(np.zeros((6, 6), np.uint8), 0, 4, 0)]
        )


def test_scenes_shapes_cache_and_disjoint_splits(fashion, tmp_path):
    train = make_scenes(20, "train", canvas=48, seed=1)
    assert train.images.shape == (20, 48, 48, 3) and train.images.dtype == np.uint8
    assert train.masks.shape == (20, 48, 48) and train.masks.dtype == np.uint8
    assert set(np.unique(train.masks)) <= set(range(11)) | {255}
    assert train.num_classes == 11 and train.class_names[0] == "background"
    assert len(list((tmp_path / "cache" / "scenes").glob("*.npz"))) == 1
    again = make_scenes(20, "train", canvas=48, seed=1)
    np.testing.assert_array_equal(again.masks, train.masks)
    fresh = make_scenes(20, "train", canvas=48, seed=1, cache=False)
    np.testing.assert_array_equal(fresh.images, train.images)
    val = make_scenes(20, "val", canvas=48, seed=1)
    assert not np.array_equal(val.images, train.images)


def test_scene_class_frequencies_follow_profile(fashion):
    scenes = make_scenes(500, "train", seed=5, imbalance_ratio=10, cache=False)
    freq = scenes.item_counts / scenes.item_counts.sum()
    order = scene_class_order(10, seed=5)
    expected = profile_weights(10, 10) / profile_weights(10, 10).sum()
    # about 1250 items: every rank's share within 0.03 of the profile's
    np.testing.assert_allclose(freq[order], expected, atol=0.03)
    assert freq[order[0]] > 5 * freq[order[-1]]


def test_scene_argument_errors():
    with pytest.raises(ValueError, match=r"split must be 'train' or 'val', got 'test'"):
        make_scenes(2, "test")
    with pytest.raises(ValueError, match=r"num_item_classes must be <= 10, got 11"):
        make_scenes(2, num_item_classes=11)
    with pytest.raises(ValueError, match=r"canvas must be an int >= 8, got 4"):
        make_scenes(2, canvas=4)


SCRIPT = """
import hashlib, numpy as np
from anchorlearn.data.scenes import make_scenes
from anchorlearn.data.long_tail import long_tailed_indices
from anchorlearn.data.fashion_mnist import load_fashion_mnist
s = make_scenes(8, "val", canvas=32, seed=11, cache=False)
idx = long_tailed_indices(load_fashion_mnist("train")[1], 50, seed=11)
h = hashlib.sha256(s.images.tobytes() + s.masks.tobytes() + idx.tobytes())
print(h.hexdigest())
"""


def test_same_seed_same_data_across_processes(fashion):
    from anchorlearn.data.fashion_mnist import load_fashion_mnist
    from anchorlearn.data.long_tail import long_tailed_indices

    scenes = make_scenes(8, "val", canvas=32, seed=11, cache=False)
    idx = long_tailed_indices(load_fashion_mnist("train")[1], 50, seed=11)
    here = hashlib.sha256(scenes.images.tobytes() + scenes.masks.tobytes() + idx.tobytes())
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == here.hexdigest()
