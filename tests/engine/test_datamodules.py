import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from anchorlearn.data.sources import load_digits_data
from anchorlearn.engine.datamodules import (
    ClassificationDataModule,
    SegmentationDataModule,
    TwoViewDataModule,
)


def fashion_available() -> bool:
    from anchorlearn.data.fashion_mnist import find_fashion_mnist

    try:
        find_fashion_mnist("train")
    except FileNotFoundError:
        return False
    return True


needs_fashion = pytest.mark.skipif(not fashion_available(), reason="Fashion-MNIST not installed")


def test_digits_classification():
    dm = ClassificationDataModule("digits", batch_size=16, val_fraction=0.1, seed=0)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 1, (8, 8))
    assert sum(dm.train_class_counts) == len(dm.dataset("train"))
    per_class = np.bincount(load_digits_data().labels)
    assert len(dm.dataset("test")) == sum(round(0.2 * n) for n in per_class)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (16, 1, 8, 8) and images.dtype == torch.uint8
    x, y = dm.on_after_batch_transfer((images, labels), 0)
    assert x.shape == (16, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    full = dm.preprocess(dm.dataset("train").tensors[0])
    assert abs(float(full.mean())) < 1e-3 and abs(float(full.std()) - 1.0) < 1e-2
    augmented = dm.preprocess(images, augment=True)
    assert augmented.shape == x.shape and not torch.equal(augmented, x)


def test_long_tail_and_determinism():
    dm = ClassificationDataModule("digits", imbalance_ratio=10, seed=3)
    counts = dm.train_class_counts
    assert max(counts) >= 8 * min(counts)
    again = ClassificationDataModule("digits", imbalance_ratio=10, seed=3)
    assert again.train_class_counts == counts
    first = next(iter(dm.train_dataloader()))[1]
    assert torch.equal(first, next(iter(again.train_dataloader()))[1])


def test_classification_argument_errors():
    with pytest.raises(ValueError, match=r"val_fraction must lie in \(0, 1\), got 1.5"):
        ClassificationDataModule("digits", val_fraction=1.5)
    with pytest.raises(ValueError, match=r"imbalance_ratio must be >= 1, got 0"):
        ClassificationDataModule("digits", imbalance_ratio=0)
    with pytest.raises(ValueError, match=r"batch_size must be an int >= 1, got 0"):
        ClassificationDataModule("digits", batch_size=0)
    with pytest.raises(ValueError, match=r"source must be .* got 'mnist'"):
        ClassificationDataModule("mnist").setup()


def test_npz_source(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "rgb.npz"
    np.savez(
        path,
        images=rng.integers(0, 256, (60, 10, 12, 3), dtype=np.uint8),
        labels=np.repeat(np.arange(3), 20),
    )
    dm = ClassificationDataModule(f"npz:{path}", batch_size=8)
    assert (dm.in_channels, dm.image_size, dm.num_classes) == (3, (10, 12), 3)
    assert next(iter(dm.val_dataloader()))[0].shape[1:] == (3, 10, 12)


@pytest.mark.parametrize(
    ("per_class", "message"),
    [
        # 3 images per class: the test split takes one, 10 % of the other two rounds to 0
        (3, r"the validation split is empty: val_fraction=0\.1 .*\(largest class: 2 images\)"),
        # 2 images per class: 20 % of them rounds to 0, so no test split can be held out
        (2, r"the test split is empty: test_fraction=0\.2 .*\(largest class: 2 images\)"),
    ],
)
def test_too_few_images_per_class_for_a_split_is_an_error(tmp_path, per_class, message):
    path = tmp_path / "tiny.npz"
    labels = np.repeat(np.arange(3), per_class)
    np.savez(path, images=np.zeros((len(labels), 4, 4), np.uint8), labels=labels)
    with pytest.raises(ValueError, match=message):
        ClassificationDataModule(f"npz:{path}", batch_size=4).setup()


@needs_fashion
def test_fashion_subset_and_lightning_hook():
    dm = ClassificationDataModule(
        "fashion_mnist", batch_size=32, max_train_samples=1000, max_test_samples=200
    )
    assert dm.image_size == (28, 28) and dm.class_names[0] == "T-shirt/top"
    assert 850 <= sum(dm.train_class_counts) <= 950
    assert len(dm.dataset("test")) == 200

    seen = []

    class Probe(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(28 * 28, 10)

        def training_step(self, batch, batch_idx):
            x, y = batch
            seen.append((x.dtype, tuple(x.shape), y.dtype))
            return nn.functional.cross_entropy(self.layer(x.flatten(1)), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(Probe(), datamodule=dm)
    assert seen == [(torch.float32, (32, 1, 28, 28), torch.int64)] * 2


@needs_fashion
def test_segmentation_scenes(tmp_path, monkeypatch):
    monkeypatch.setenv("ANCHORLEARN_CACHE", str(tmp_path))
    dm = SegmentationDataModule(num_train=24, num_val=8, canvas=32, batch_size=8)
    assert (dm.num_classes, dm.ignore_index, dm.in_channels, dm.image_size) == (
        11,
        255,
        3,
        (32, 32),
    )
    assert len(dm.train_class_pixel_counts) == 11 and dm.train_class_pixel_counts[0] > 0
    images, masks = next(iter(dm.train_dataloader()))
    x, y = dm.preprocess(images, masks, augment=True)
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (8, 32, 32) and y.dtype == torch.int64
    assert set(y.unique().tolist()) <= set(range(11)) | {255}
    # val_fraction=0.2 of the 24 training scenes is held out; the 8 test scenes are separate.
    assert (len(dm.dataset("train")), len(dm.dataset("val")), len(dm.dataset("test"))) == (
        19,
        5,
        8,
    )


def test_segmentation_folder(tmp_path):
    from PIL import Image

    for i in range(10):
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "masks").mkdir(exist_ok=True)
        Image.new("RGB", (6, 6), (i, i, i)).save(tmp_path / "images" / f"{i}.png")
        Image.fromarray(np.full((6, 6), i % 2, np.uint8)).save(tmp_path / "masks" / f"{i}.png")
    dm = SegmentationDataModule(f"folder:{tmp_path}", val_fraction=0.25, batch_size=2)
    sizes = {split: len(dm.dataset(split)) for split in ("train", "val", "test")}
    assert dm.num_classes == 2 and sizes == {"train": 6, "val": 2, "test": 2}
    # three disjoint splits: the test images are never the validation images
    ids = {
        split: {int(img[0, 0, 0]) for img in dm.dataset(split).tensors[0]}
        for split in ("train", "val", "test")
    }
    assert set().union(*ids.values()) == set(range(10))
    assert not ids["val"] & ids["test"] and not ids["train"] & (ids["val"] | ids["test"])
    other_seed = SegmentationDataModule(f"folder:{tmp_path}", val_fraction=0.25, seed=1)
    assert {int(img[0, 0, 0]) for img in other_seed.dataset("test").tensors[0]} == ids["test"]
    with pytest.raises(ValueError, match=r"source must be 'scenes' or 'folder:PATH'"):
        SegmentationDataModule("cityscapes")


def test_two_view_digits():
    dm = TwoViewDataModule("digits", batch_size=16, max_train_samples=200)
    images, index = next(iter(dm.train_dataloader()))
    assert images.shape == (16, 1, 8, 8) and index.dtype == torch.int64
    v1, v2 = dm.views(images)
    assert v1.shape == v2.shape == (16, 1, 8, 8) and not torch.equal(v1, v2)
    bank, test = dm.val_dataloader()
    x, y = dm.on_after_batch_transfer(next(iter(test)), 1)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(bank.dataset) == len(dm.labelled_dataset("train"))
    assert dm.num_classes == 10


@needs_fashion
def test_two_view_fashion_labels_are_writable_copies():
    # the cached Fashion-MNIST arrays are read-only; tensors sharing them would be written to
    from anchorlearn.data.sources import load_classification_source

    _, source_test = load_classification_source("fashion_mnist", None)
    assert not source_test.labels.flags.writeable
    dm = TwoViewDataModule("fashion_mnist", max_train_samples=100)  # test split not capped
    images, labels = dm.labelled_dataset("test").tensors
    assert images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert len(labels) == len(source_test.labels)
    assert not np.shares_memory(labels.numpy(), source_test.labels)


def test_missing_fashion_mnist_message(tmp_path, monkeypatch):
    from anchorlearn.data import fashion_mnist as fm

    monkeypatch.setenv("ANCHORLEARN_DATA", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "none")
    with pytest.raises(FileNotFoundError, match=r"Searched:") as info:
        ClassificationDataModule("fashion_mnist").setup()
    assert str(tmp_path / "fashion-mnist") in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"make data"):
        ClassificationDataModule("fashion_mnist", data_root=tmp_path).setup()
