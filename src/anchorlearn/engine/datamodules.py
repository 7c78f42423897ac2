"""Lightning DataModules that keep whole data sets in memory as uint8 tensors.

Loaders yield uint8 images; :meth:`on_after_batch_transfer` (run by Lightning on the
training device, so on the GPU when there is one) converts them to float, augments them
when training, and normalises them with the training set's per-channel mean and std. Code
that iterates a loader outside Lightning calls ``preprocess`` itself.

Shuffling uses a generator seeded with ``seed`` and workers are seeded from it, so a run
is reproducible for a given ``seed`` and ``num_workers``.
"""

from __future__ import annotations

import hashlib
import os
import random
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from anchorlearn.data.augment import (
    TwoViewTransform,
    classification_train_augment,
    segmentation_train_augment,
    ssl_augment,
    strong_augment,
)
from anchorlearn.data.long_tail import PROFILES, long_tailed_indices
from anchorlearn.data.scenes import make_scenes
from anchorlearn.data.sources import (
    IGNORE_INDEX,
    ClassificationData,
    load_classification_source,
    load_segmentation_folder,
)
from anchorlearn.data.splits import labelled_split, stratified_split

from .schema import ConfigError

__all__ = [
    "ClassificationDataModule",
    "CyclingSampler",
    "EpochShuffleSampler",
    "SegmentationDataModule",
    "SemiSupervisedBatch",
    "TwoViewDataModule",
]


def _seed_worker(worker_id: int) -> None:
    """Seed numpy and ``random`` in a loader worker from its torch seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)  # noqa: NPY002  (the legacy global state user code may rely on)
    random.seed(seed)


class EpochShuffleSampler(Sampler[int]):
    """A random permutation that depends only on ``(seed, epoch)``.

    Lightning calls :meth:`set_epoch` at every epoch start, so a run resumed from a
    checkpoint sees the same batches as an uninterrupted one (a loader's own generator
    would restart its sequence on resume).
    """

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


class CyclingSampler(Sampler[int]):
    """``length`` indices of ``range(num_samples)``: random permutations one after the
    other (the last cut short), all drawn from a generator seeded with ``(seed, epoch)``.

    The labelled images of semi-supervised training: their set is smaller than an epoch
    needs, so it is cycled, reshuffled at each pass. Like :class:`EpochShuffleSampler`
    the order depends only on ``(seed, epoch)`` (Lightning calls :meth:`set_epoch`), so a
    resumed run sees the same batches.
    """

    def __init__(self, num_samples: int, length: int, seed: int) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = num_samples
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        # a stream apart from EpochShuffleSampler's (seed * 100_003 + epoch)
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch + 2**40)
        passes = -(-self.length // self.num_samples)
        order = [torch.randperm(self.num_samples, generator=generator) for _ in range(passes)]
        return iter(torch.cat(order)[: self.length].tolist())

    def __len__(self) -> int:
        return self.length


class SemiSupervisedBatch(typing.NamedTuple):
    """A semi-supervised training batch, as
    :meth:`ClassificationDataModule.on_after_batch_transfer` (or, for segmentation,
    :meth:`~anchorlearn.engine.segmentation.SegmentationFilesDataModule.on_after_batch_transfer`)
    makes it.

    ``images`` ``(B, C, H, W)`` and ``labels`` ``(B,)`` (segmentation: ``(B, H, W)``
    masks): the labelled images (weak view). ``weak`` and ``strong`` ``(M, C, H, W)``: two
    views of the same ``M`` unlabelled images, weakly and strongly augmented (for
    segmentation pixel-aligned: the strong view changes colours only). ``hidden_labels``
    ``(M,)`` (``(M, H, W)``): their true labels, for logging the accuracy of the
    pseudo-labels only; never a training target. ``valid`` (segmentation; ``None`` for
    classification) ``(M, H, W)`` bool: the pixels of the unlabelled crops that show the
    image (not the padding around a small one). All images normalised.
    """

    images: torch.Tensor
    labels: torch.Tensor
    weak: torch.Tensor
    strong: torch.Tensor
    hidden_labels: torch.Tensor
    valid: torch.Tensor | None = None


def _writable_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor of ``array``, copied when it is read-only (a memory map of cached data)."""
    array = np.ascontiguousarray(array)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _to_nchw(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W)`` or ``(N, H, W, C)`` numpy -> contiguous uint8 ``(N, C, H, W)``."""
    tensor = _writable_tensor(images)
    if tensor.ndim == 3:
        return tensor[:, None].contiguous()
    return tensor.permute(0, 3, 1, 2).contiguous()


def _image_label_dataset(split: ClassificationData) -> TensorDataset:
    """``(N, C, H, W)`` uint8 images and int64 labels of ``split``, both writable copies."""
    return TensorDataset(_to_nchw(split.images), torch.from_numpy(split.labels.astype(np.int64)))


def _channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 ``(N, C, H, W)`` images scaled to ``[0, 1]``."""
    flat = images.transpose(0, 1).reshape(images.shape[1], -1).double() / 255.0
    mean, std = flat.mean(dim=1), flat.std(dim=1).clamp_min(1e-6)
    return mean.float(), std.float()


def _check_fraction(value: float, name: str, low_open: bool) -> float:
    value = float(value)
    ok = (0.0 < value < 1.0) if low_open else (0.0 <= value < 1.0)
    if not ok:
        interval = "(0, 1)" if low_open else "[0, 1)"
        raise ValueError(f"{name} must lie in {interval}, got {value}")
    return value


def _check_optional_count(value: int | None, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")


def _largest_class(labels: np.ndarray) -> int:
    return int(np.bincount(labels).max()) if len(labels) else 0


@dataclass
class _Tracked(ClassificationData):
    """Samples that know their positions in the array (``pool``) the source loaded."""

    positions: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    pool: str = "train"


def _tracked(data: ClassificationData, pool: str) -> _Tracked:
    positions = np.arange(len(data.labels), dtype=np.int64)
    return _Tracked(data.images, data.labels, data.class_names, positions, pool)


def _subset(data: ClassificationData, indices: np.ndarray) -> ClassificationData:
    if isinstance(data, _Tracked):
        return _Tracked(
            data.images[indices],
            data.labels[indices],
            data.class_names,
            data.positions[indices],
            data.pool,
        )
    return ClassificationData(data.images[indices], data.labels[indices], data.class_names)


def _sha256(*arrays: np.ndarray | torch.Tensor) -> str:
    """sha256 of the arrays' bytes (C order) one after the other."""
    digest = hashlib.sha256()
    for array in arrays:
        values = array.numpy() if isinstance(array, torch.Tensor) else array
        digest.update(np.ascontiguousarray(values).reshape(-1).view(np.uint8))
    return digest.hexdigest()


def _cap(data: ClassificationData, max_samples: int | None, seed: int) -> ClassificationData:
    """A stratified subset of about ``max_samples`` samples (all when ``None`` or more)."""
    if max_samples is None or max_samples >= len(data.labels):
        return data
    kept, _ = stratified_split(data.labels, 1.0 - max_samples / len(data.labels), seed)
    return _subset(data, kept)


def _stratified_sample(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of exactly ``size`` of ``labels`` (``size`` <= their number), drawn
    per class with a generator seeded with ``seed``: one image of every class first (of the
    largest classes when ``size`` is below the number of classes), the rest in proportion
    to what each class has left, remainders to the largest fractional parts."""
    classes, counts = np.unique(labels, return_counts=True)
    take = np.zeros(len(classes), dtype=np.int64)
    order = np.argsort(-counts, kind="stable")
    take[order[: min(size, len(classes))]] = 1
    left, rest = counts - take, size - int(take.sum())
    if rest > 0:
        share, remainder = np.divmod(rest * left, left.sum())  # exact integer quotas
        by_remainder = np.argsort(-remainder, kind="stable")
        share[by_remainder[: rest - int(share.sum())]] += 1
        take += share
    rng = np.random.default_rng(seed)
    chosen = [
        rng.permutation(np.flatnonzero(labels == cls))[:n]
        for cls, n in zip(classes, take, strict=True)
    ]
    return np.sort(np.concatenate([np.empty(0, dtype=np.int64), *chosen]))


def _cap_exactly(
    data: ClassificationData, max_samples: int | None, seed: int
) -> ClassificationData:
    """A stratified subset of exactly ``max_samples`` samples (all when ``None`` or more)."""
    if max_samples is None or max_samples >= len(data.labels):
        return data
    return _subset(data, _stratified_sample(data.labels, max_samples, seed))


class _InMemoryDataModule(L.LightningDataModule):
    """Loaders over in-memory tensors and float conversion / normalisation of batches."""

    def __init__(self, batch_size: int, num_workers: int, seed: int, augment: bool) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = int(seed)
        self.augment = bool(augment)
        # the epoch training starts at: a resumed run's, set by the runner from its
        # checkpoint (see _loader)
        self.start_epoch = 0
        self._ready = False
        # split -> (the source array its samples come from, their positions there)
        self._split_positions: dict[str, tuple[str, np.ndarray]] = {}
        self._class_names: list[str] = []
        self._splits: dict[str, TensorDataset] = {}
        self._train_images = torch.zeros(0, 1, 1, 1, dtype=torch.uint8)
        self.mean = torch.zeros(1)
        self.std = torch.ones(1)

    def _load(self) -> None:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Load everything once (idempotent); properties call it on first use."""
        if not self._ready:
            self._load()
            self._ready = True

    def _loader(
        self,
        dataset: Dataset,
        shuffle: bool,
        *,
        sampler: Sampler[int] | None = None,
        batch_size: int | None = None,
    ) -> DataLoader:
        """A loader of ``dataset`` in batches of ``batch_size`` (default: the module's):
        in the order of ``sampler`` when given, else shuffled by an
        :class:`EpochShuffleSampler` when ``shuffle``, else in order."""
        self.setup()
        if sampler is None and shuffle:
            sampler = EpochShuffleSampler(len(dataset), self.seed)
        if sampler is not None:
            # Lightning makes the first training iterator before it restores a checkpoint's
            # epoch (the schedule's step count asks for the loader), and with worker
            # processes that iterator reads its sampler at once: a resumed run's first
            # epoch would replay epoch 0's order unless the sampler starts at that epoch
            sampler.set_epoch(self.start_epoch)
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            dataset,
            batch_size=self.batch_size if batch_size is None else batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            generator=generator,
            worker_init_fn=_seed_worker,
            persistent_workers=self.num_workers > 0,
        )

    @property
    def class_names(self) -> list[str]:
        self.setup()
        return self._class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_channels(self) -> int:
        self.setup()
        return int(self._train_images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        """``(height, width)``."""
        self.setup()
        return tuple(self._train_images.shape[2:])

    def dataset(self, split: str) -> TensorDataset:
        """uint8 images ``(N, C, H, W)`` and their int64 labels or uint8 masks of a split."""
        self.setup()
        if split not in self._splits:
            raise ValueError(f"split must be one of {sorted(self._splits)}, got {split!r}")
        return self._splits[split]

    def _fingerprinted_splits(self) -> dict[str, TensorDataset]:
        return self._splits

    def data_fingerprint(self) -> dict[str, Any]:
        """What a run reads, to check later that the data did not change.

        ``{"version", "kind": "arrays", "source", "splits", "split_indices_sha256"}``: for
        every split the number of samples, the image shape ``[C, H, W]`` and
        ``content_sha256``, the sha256 of the split's uint8 image bytes followed by its
        label (or mask) bytes, in loader order (``(N, C, H, W)`` uint8 and int64 labels or
        uint8 masks); and the sha256 of the split indices, the positions of every split's
        samples in the arrays the source loaded. Hashing tens of MB takes a fraction of a
        second.
        """
        self.setup()
        splits = {
            name: {
                "samples": len(dataset),
                "image_shape": list(dataset.tensors[0].shape[1:]),
                "content_sha256": _sha256(*dataset.tensors),
            }
            for name, dataset in self._fingerprinted_splits().items()
        }
        indices = hashlib.sha256()
        for name, (pool, positions) in sorted(self._split_positions.items()):
            indices.update(f"{name}<-{pool}:".encode())
            indices.update(np.ascontiguousarray(positions, dtype=np.int64).view(np.uint8))
        return {
            "version": 1,
            "kind": "arrays",
            "source": self.source,
            "splits": splits,
            "split_indices_sha256": indices.hexdigest(),
        }

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("train"), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"), shuffle=False)

    def _training(self) -> bool:
        trainer = self.trainer
        return trainer is not None and bool(trainer.training)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Float ``[0, 1]`` images -> ``(x - mean) / std`` per channel."""
        mean = self.mean.to(images.device, images.dtype)[None, :, None, None]
        std = self.std.to(images.device, images.dtype)[None, :, None, None]
        return (images - mean) / std


class ClassificationDataModule(_InMemoryDataModule):
    """Image classification, optionally long-tailed.

    Args:
        source: ``"fashion_mnist"``, ``"digits"`` (scikit-learn, 8x8), ``"cifar10:ROOT"``,
            ``"npz:PATH"`` or ``"folder:PATH"`` (see :mod:`anchorlearn.data.sources`).
        imbalance_ratio: long-tail ratio applied to the training split (1 = as loaded);
            the test split stays as it is.
        profile: ``"exp"`` or ``"step"``.
        val_fraction: fraction of every class of the (long-tailed) training data held out
            for validation, in ``(0, 1)``.
        test_fraction: for sources without a test split (all but Fashion-MNIST and
            CIFAR-10), the stratified fraction held out as the test split (fixed split,
            seed 0).
        batch_size: loader batch size.
        num_workers: loader workers.
        seed: class order and images of the long tail, the validation split, the
            subsampling and the shuffling.
        max_train_samples: keep a stratified subset of about this many training images
            (before the long tail and the validation split), for fast runs.
        max_test_samples: score on a stratified subset of exactly this many test images
            (every class kept: fewer than the classes of the test split is a
            ``ValueError`` when the data are loaded), drawn with ``seed`` too: runs of one
            seed share their test images, other seeds are scored on other subsets.
        augment: apply :func:`classification_train_augment` to training batches.
        data_root: Fashion-MNIST directory (see :func:`load_fashion_mnist`).
        labelled_fraction: semi-supervised training (Sohn et al. 2020, FixMatch, NeurIPS):
            the training images (after ``max_train_samples``, the long tail and the
            validation split) are split by :func:`~anchorlearn.data.splits.labelled_split`
            with ``seed`` into ``round(labelled_fraction * n_c)`` labelled images of every
            class ``c`` (split ``"train"``; a class left with none is a
            :class:`ConfigError`) and the rest, split ``"unlabelled"``, whose labels are
            never training targets. ``None``: every training image is labelled.
        unlabelled_ratio: unlabelled images per labelled image in a step (FixMatch's mu).
        unlabelled_batches: with ``labelled_fraction``, whether the training loader draws
            unlabelled batches (``False``: the labelled images alone, on the same number of
            steps per epoch).

    Batches after :meth:`on_after_batch_transfer`: float ``(B, C, H, W)`` normalised
    images and int64 ``(B,)`` labels. With ``labelled_fraction`` (and
    ``unlabelled_batches``) a training step gets a :class:`SemiSupervisedBatch`: ``B`` =
    ``batch_size`` labelled images and ``unlabelled_ratio * batch_size`` unlabelled ones
    seen in a weak view (:func:`classification_train_augment`, when ``augment``) and a
    strong one (:func:`~anchorlearn.data.augment.strong_augment` of the weak view). An
    epoch is one pass over the unlabelled images, in ``ceil(U / (mu * B))`` steps; the
    labelled images are cycled (:class:`CyclingSampler`). Without unlabelled images
    (``labelled_fraction`` 1) an epoch is one pass over the labelled ones.
    """

    def __init__(
        self,
        source: str = "fashion_mnist",
        imbalance_ratio: float = 1.0,
        profile: str = "exp",
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        max_train_samples: int | None = None,
        max_test_samples: int | None = None,
        augment: bool = True,
        data_root: str | os.PathLike[str] | None = None,
        labelled_fraction: float | None = None,
        unlabelled_ratio: int = 7,
        unlabelled_batches: bool = True,
    ) -> None:
        super().__init__(batch_size, num_workers, seed, augment)
        if labelled_fraction is not None and (
            isinstance(labelled_fraction, bool) or not 0.0 < float(labelled_fraction) <= 1.0
        ):
            raise ValueError(
                f"labelled_fraction must be None or in (0, 1], got {labelled_fraction!r}"
            )
        if (
            isinstance(unlabelled_ratio, bool)
            or not isinstance(unlabelled_ratio, int)
            or unlabelled_ratio < 1
        ):
            raise ValueError(f"unlabelled_ratio must be an int >= 1, got {unlabelled_ratio!r}")
        self.labelled_fraction = None if labelled_fraction is None else float(labelled_fraction)
        self.unlabelled_ratio = unlabelled_ratio
        self.unlabelled_batches = bool(unlabelled_batches)
        if not float(imbalance_ratio) >= 1.0:
            raise ValueError(f"imbalance_ratio must be >= 1, got {imbalance_ratio!r}")
        if profile not in PROFILES:
            raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
        _check_optional_count(max_train_samples, "max_train_samples")
        _check_optional_count(max_test_samples, "max_test_samples")
        self.source = source
        self.imbalance_ratio = float(imbalance_ratio)
        self.profile = profile
        self.val_fraction = _check_fraction(val_fraction, "val_fraction", low_open=True)
        self.test_fraction = _check_fraction(test_fraction, "test_fraction", low_open=True)
        self.max_train_samples = max_train_samples
        self.max_test_samples = max_test_samples
        self.data_root = data_root
        self.save_hyperparameters()

    def _load(self) -> None:
        train, test = load_classification_source(self.source, self.data_root)
        train, test = _tracked(train, "train"), None if test is None else _tracked(test, "test")
        # largest class of the pool each split is drawn from, for the empty-split error
        pools: dict[str, int | None] = {"test": None}
        if test is None:
            pools["test"] = _largest_class(train.labels)
            kept, held = stratified_split(train.labels, self.test_fraction, seed=0)
            train, test = _subset(train, kept), _subset(train, held)
        train = _cap(train, self.max_train_samples, self.seed)
        self._check_max_test_samples(test.labels)
        test = _cap_exactly(test, self.max_test_samples, self.seed)
        train = _subset(
            train,
            long_tailed_indices(train.labels, self.imbalance_ratio, self.profile, self.seed),
        )
        pools["validation"] = _largest_class(train.labels)
        kept, held = stratified_split(train.labels, self.val_fraction, self.seed)
        val, train = _subset(train, held), _subset(train, kept)
        for name, split, fraction in (
            ("test", test, f"test_fraction={self.test_fraction}"),
            ("validation", val, f"val_fraction={self.val_fraction}"),
        ):
            if len(split.labels) > 0:
                continue
            if pools[name] is None:
                raise ValueError(f"{self.source}: the test split of this data set is empty")
            raise ValueError(
                f"{self.source}: the {name} split is empty: {fraction} of every class "
                f"rounds to 0 images (largest class: {pools[name]} images); use more "
                "images per class or a larger fraction"
            )
        self._class_names = list(train.class_names)
        named = [("train", train), ("val", val), ("test", test)]
        if self.labelled_fraction is not None:
            train, unlabelled = self._split_labelled(train)
            named = [("train", train), ("unlabelled", unlabelled), ("val", val), ("test", test)]
        self._split_positions = {name: (split.pool, split.positions) for name, split in named}
        self._splits = {}
        for name, split in named:
            self._splits[name] = _image_label_dataset(split)
        train_images = self._train_images = self._splits["train"].tensors[0]
        if self.labelled_fraction is None:
            self.mean, self.std = _channel_stats(train_images)
        else:  # pixel statistics need no labels: all the training images
            unlabelled_images = self._splits["unlabelled"].tensors[0]
            self.mean, self.std = _channel_stats(torch.cat([train_images, unlabelled_images]))
            self._strong_augment = strong_augment(tuple(train_images.shape[2:]))
        self._train_augment = classification_train_augment(tuple(train_images.shape[2:]))

    def _split_labelled(self, train: ClassificationData) -> tuple[_Tracked, _Tracked]:
        """The labelled and unlabelled parts of the training images."""
        try:
            labelled, unlabelled = labelled_split(
                train.labels,
                float(self.labelled_fraction),
                self.seed,
                name="data.labelled_fraction",
                class_names=train.class_names,
            )
        except ValueError as err:
            raise ConfigError(f"{self.source}: {err}") from None
        if len(unlabelled) == 0 and self.unlabelled_batches:
            raise ConfigError(
                f"data.labelled_fraction={self.labelled_fraction} labels every one of the "
                f"{len(train.labels)} training images: no unlabelled image is left for the "
                "unlabelled batches; use a smaller fraction, or semi.unlabelled_weight: 0 "
                "to train on the labelled images alone"
            )
        return _subset(train, labelled), _subset(train, unlabelled)

    @property
    def semi_supervised(self) -> bool:
        """Whether training batches are :class:`SemiSupervisedBatch` es."""
        return self.labelled_fraction is not None and self.unlabelled_batches

    @property
    def train_steps_per_epoch(self) -> int:
        """With ``labelled_fraction``: steps of a training epoch, ``ceil(U / (mu * B))``
        (one pass over the ``U`` unlabelled images; ``ceil(L / B)`` over the ``L`` labelled
        ones when there is no unlabelled image); else ``ceil(N / B)``."""
        self.setup()
        unlabelled = len(self._splits.get("unlabelled", ()))
        if unlabelled:
            return -(-unlabelled // (self.unlabelled_ratio * self.batch_size))
        return -(-len(self._splits["train"]) // self.batch_size)

    def image_counts(self) -> dict[str, int] | None:
        """With ``labelled_fraction``: ``{"labelled_images", "unlabelled_images"}``, the
        sizes of the two parts of the training images; ``None`` without."""
        if self.labelled_fraction is None:
            return None
        self.setup()
        return {
            "labelled_images": len(self._splits["train"]),
            "unlabelled_images": len(self._splits["unlabelled"]),
        }

    def train_dataloader(self) -> DataLoader | CombinedLoader:
        """The training batches: see the class docstring."""
        if self.labelled_fraction is None:
            return super().train_dataloader()
        labelled = self.dataset("train")
        length = len(labelled)  # no unlabelled image: one pass over the labelled ones
        if len(self.dataset("unlabelled")):
            length = self.train_steps_per_epoch * self.batch_size
        labelled_loader = self._loader(
            labelled, True, sampler=CyclingSampler(len(labelled), length, self.seed)
        )
        if not self.unlabelled_batches:
            return labelled_loader
        unlabelled_loader = self._loader(
            self.dataset("unlabelled"), True, batch_size=self.unlabelled_ratio * self.batch_size
        )
        return CombinedLoader(
            {"labelled": labelled_loader, "unlabelled": unlabelled_loader}, mode="max_size_cycle"
        )

    def _check_max_test_samples(self, test_labels: np.ndarray) -> None:
        """``max_test_samples`` keeps an image of every class of the test split: the
        evaluation after training scores and compares the classes (one image is one class,
        and a t-SNE needs more than two), so a smaller subset is refused before training."""
        present = len(np.unique(test_labels))
        if self.max_test_samples is not None and self.max_test_samples < present:
            raise ValueError(
                f"data.max_test_samples={self.max_test_samples} is below the {present} classes "
                f"of the test split of {self.source}: every class needs a test image; set it "
                f"to at least {present} or remove it"
            )

    @property
    def train_class_counts(self) -> list[int]:
        """Training images per class (after long tail and validation split); with
        ``labelled_fraction``, the labelled images only."""
        self.setup()
        labels = self._splits["train"].tensors[1]
        return torch.bincount(labels, minlength=self.num_classes).tolist()

    def preprocess(self, images: torch.Tensor, augment: bool = False) -> torch.Tensor:
        """uint8 ``(B, C, H, W)`` -> normalised float, augmented first when ``augment``."""
        self.setup()
        x = images.float() / 255.0
        if augment:
            x = self._train_augment(x)
        return self.normalize(x)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict):  # the semi-supervised training loader
            return self.semi_supervised_views(batch)
        images, labels = batch
        return self.preprocess(images, augment=self.augment and self._training()), labels

    def semi_supervised_views(self, batch: dict[str, Any]) -> SemiSupervisedBatch:
        """``{"labelled": (images, labels), "unlabelled": (images, hidden_labels)}`` of
        uint8 images -> a :class:`SemiSupervisedBatch`: the labelled images and the
        unlabelled ones weakly augmented (when ``augment``), a strong view of the
        unlabelled ones (:func:`~anchorlearn.data.augment.strong_augment` of a weak view of
        its own), all normalised. Random draws come from torch's global generator, in that
        order."""
        self.setup()
        images, labels = batch["labelled"]
        unlabelled, hidden_labels = batch["unlabelled"]
        labelled = self.preprocess(images, augment=self.augment)
        weak = self.preprocess(unlabelled, augment=self.augment)
        x = unlabelled.float() / 255.0
        if self.augment:
            x = self._train_augment(x)
        strong = self.normalize(self._strong_augment(x))
        return SemiSupervisedBatch(labelled, labels, weak, strong, hidden_labels)


def _holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and held-out indices of ``n`` items, ``round(fraction * n)`` (>= 1) held out."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(max(1, round(fraction * n)), n - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


class SegmentationDataModule(_InMemoryDataModule):
    """Semantic segmentation on composited scenes or a user's folder.

    Args:
        source: ``"scenes"`` (:func:`anchorlearn.data.scenes.make_scenes`; the test scenes
            use Fashion-MNIST test items, disjoint from the training items) or
            ``"folder:PATH"`` (:func:`anchorlearn.data.sources.load_segmentation_folder`).
        num_train: number of training scenes (``val_fraction`` of them held out for
            validation).
        num_val: number of test scenes (built from Fashion-MNIST test items).
        canvas: scene side in pixels.
        max_items: at most this many items per scene.
        num_item_classes: Fashion-MNIST item classes used (classes = this + 1).
        imbalance_ratio: long-tail ratio of the item class frequencies.
        ignore_border: 1-pixel ignore band (255) at item edges.
        resize: folder source only: ``None``, an int or ``(height, width)``.
        val_fraction: fraction of the training scenes (or of the folder images left after
            the test split) held out for validation.
        test_fraction: folder source only: fraction of the images held out as the test
            split (fixed: seed 0), before the validation split.
        batch_size: loader batch size.
        num_workers: loader workers.
        seed: scenes, split and shuffling.
        augment: apply :func:`segmentation_train_augment` to training batches.
        data_root: Fashion-MNIST directory.

    Batches after :meth:`on_after_batch_transfer`: float ``(B, C, H, W)`` normalised
    images and int64 ``(B, H, W)`` masks with ``ignore_index`` = 255.
    """

    ignore_index = IGNORE_INDEX

    def __init__(
        self,
        source: str = "scenes",
        num_train: int = 2000,
        num_val: int = 500,
        canvas: int = 64,
        max_items: int = 4,
        num_item_classes: int = 10,
        imbalance_ratio: float = 10,
        ignore_border: bool = True,
        resize: int | Sequence[int] | None = None,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        augment: bool = True,
        data_root: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, seed, augment)
        kind, _, path = source.partition(":")
        if source != "scenes" and not (kind == "folder" and path):
            raise ValueError(f"source must be 'scenes' or 'folder:PATH', got {source!r}")
        self.source = source
        self.scene_kwargs = {
            "canvas": canvas,
            "max_items": max_items,
            "num_item_classes": num_item_classes,
            "imbalance_ratio": imbalance_ratio,
            "ignore_border": ignore_border,
            "seed": seed,
            "data_root": data_root,
        }
        self.num_train = num_train
        self.num_val = num_val
        self.resize = resize
        self.val_fraction = _check_fraction(val_fraction, "val_fraction", low_open=True)
        self.test_fraction = _check_fraction(test_fraction, "test_fraction", low_open=True)
        self.save_hyperparameters()

    def _load(self) -> None:
        if self.source == "scenes":
            scenes = make_scenes(self.num_train, "train", **self.scene_kwargs)
            test = make_scenes(self.num_val, "val", **self.scene_kwargs)
            train_idx, val_idx = _holdout(len(scenes.images), self.val_fraction, self.seed)
            pairs = {
                "train": (scenes.images[train_idx], scenes.masks[train_idx]),
                "val": (scenes.images[val_idx], scenes.masks[val_idx]),
                "test": (test.images, test.masks),
            }
            names = scenes.class_names
            self._split_positions = {
                "train": ("train", train_idx),
                "val": ("train", val_idx),
                "test": ("val", np.arange(len(test.images))),
            }
        else:
            data = load_segmentation_folder(self.source.partition(":")[2], self.resize)
            if len(data.images) < 3:
                raise ValueError(
                    f"{self.source}: need at least 3 images to hold out a validation and a "
                    f"test split, got {len(data.images)}"
                )
            # a fixed test split (seed 0, as the classification sources'), then validation
            rest, test_idx = _holdout(len(data.images), self.test_fraction, 0)
            train_pos, val_pos = _holdout(len(rest), self.val_fraction, self.seed)
            train_idx, val_idx = rest[train_pos], rest[val_pos]
            pairs = {
                "train": (data.images[train_idx], data.masks[train_idx]),
                "val": (data.images[val_idx], data.masks[val_idx]),
                "test": (data.images[test_idx], data.masks[test_idx]),
            }
            names = data.class_names
            self._split_positions = {
                "train": ("folder", train_idx),
                "val": ("folder", val_idx),
                "test": ("folder", test_idx),
            }
        self._class_names = list(names)
        self._splits = {
            split: TensorDataset(_to_nchw(images), _writable_tensor(masks))
            for split, (images, masks) in pairs.items()
        }
        train_images = self._train_images = self._splits["train"].tensors[0]
        self.mean, self.std = _channel_stats(train_images)
        self._train_augment = segmentation_train_augment(tuple(train_images.shape[2:]))

    @property
    def train_class_pixel_counts(self) -> list[int]:
        """Training pixels per class, ignore pixels excluded."""
        self.setup()
        masks = self._splits["train"].tensors[1].reshape(-1).long()
        counts = torch.bincount(masks, minlength=max(self.num_classes, IGNORE_INDEX + 1))
        return counts[: self.num_classes].tolist()

    def preprocess(
        self, images: torch.Tensor, masks: torch.Tensor, augment: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images and masks -> normalised float images and int64 masks."""
        self.setup()
        x, y = images.float() / 255.0, masks.long()
        if augment:
            x, y = self._train_augment(x, y)
        return self.normalize(x), y

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, masks = batch
        return self.preprocess(images, masks, augment=self.augment and self._training())


class TwoViewDataModule(_InMemoryDataModule):
    """Self-supervised learning: unlabelled training images seen as two augmented views,
    plus labelled train / test sets for a linear probe or kNN.

    Args:
        source: as :class:`ClassificationDataModule` (labels are only used by the probe
            sets).
        test_fraction: test split of sources without one (fixed, seed 0).
        batch_size: loader batch size.
        num_workers: loader workers.
        seed: subsampling and shuffling.
        max_train_samples: stratified subset of about this many training images.
        max_test_samples: the same for the test split, drawn with ``seed`` too: runs of
            one seed share their test images, other seeds are scored on other subsets.
        view_transform: the augmentation of each view (default :func:`ssl_augment` with
            ``crop_min_scale``).
        data_root: Fashion-MNIST directory.
        val_fraction: when above 0, a stratified fraction of the (capped) training images,
            drawn with ``seed``, is held out and takes the place of the test split: the
            model pretrains, and probes fit, on the rest, and the evaluation scores the
            held-out images (:attr:`eval_split` is ``"val"``); the test images are
            loaded with the source but never scored or used (``max_test_samples`` must
            stay ``None``). For choosing settings without looking at the test set.
        crop_min_scale: the smallest area fraction of the views' random resized crop.

    Training batches after :meth:`on_after_batch_transfer`: ``(view1, view2, index)``,
    two float ``(B, C, H, W)`` views and the int64 ``(B,)`` indices of the images in the
    training set (for cluster assignments). ``val_dataloader`` returns two labelled loaders:
    ``dataloader_idx`` 0 = training images (memory bank), 1 = test images; their batches
    become ``(images, labels)`` with normalised float images.
    """

    def __init__(
        self,
        source: str = "fashion_mnist",
        test_fraction: float = 0.2,
        batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 0,
        max_train_samples: int | None = None,
        max_test_samples: int | None = None,
        view_transform: nn.Module | None = None,
        data_root: str | os.PathLike[str] | None = None,
        val_fraction: float = 0.0,
        crop_min_scale: float = 0.2,
    ) -> None:
        super().__init__(batch_size, num_workers, seed, augment=True)
        _check_optional_count(max_train_samples, "max_train_samples")
        _check_optional_count(max_test_samples, "max_test_samples")
        self.source = source
        self.test_fraction = _check_fraction(test_fraction, "test_fraction", low_open=True)
        if val_fraction:
            _check_fraction(val_fraction, "val_fraction", low_open=True)
            if max_test_samples is not None:
                raise ValueError(
                    f"max_test_samples={max_test_samples} caps the test split, which "
                    f"val_fraction={val_fraction} does not score: leave it None"
                )
        self.val_fraction = float(val_fraction)
        if not 0.0 < float(crop_min_scale) <= 1.0:
            raise ValueError(f"crop_min_scale must lie in (0, 1], got {crop_min_scale}")
        self.crop_min_scale = float(crop_min_scale)
        self.max_train_samples = max_train_samples
        self.max_test_samples = max_test_samples
        self.view_transform = view_transform
        self.data_root = data_root
        self.save_hyperparameters(ignore=["view_transform"])

    def _load(self) -> None:
        train, test = load_classification_source(self.source, self.data_root)
        train, test = _tracked(train, "train"), None if test is None else _tracked(test, "test")
        if test is None:
            kept, held = stratified_split(train.labels, self.test_fraction, seed=0)
            train, test = _subset(train, kept), _subset(train, held)
        train = _cap(train, self.max_train_samples, self.seed)
        if self.val_fraction:
            kept, held = stratified_split(train.labels, self.val_fraction, seed=self.seed)
            if not len(held):
                raise ValueError(
                    f"val_fraction={self.val_fraction} holds out no image of the "
                    f"{len(train.labels)} training images: raise it"
                )
            train, test = _subset(train, kept), _subset(train, held)
        else:
            test = _cap(test, self.max_test_samples, self.seed)
        self._class_names = list(train.class_names)
        self._split_positions = {"train": (train.pool, train.positions)}
        self._split_positions["test"] = (test.pool, test.positions)
        self._labelled = {
            name: _image_label_dataset(split) for name, split in (("train", train), ("test", test))
        }
        train_images = self._train_images = self._labelled["train"].tensors[0]
        self._unlabelled = TensorDataset(train_images, torch.arange(len(train_images)))
        self.mean, self.std = _channel_stats(train_images)
        view = self.view_transform or ssl_augment(
            tuple(train_images.shape[2:]), min_scale=self.crop_min_scale
        )
        self.two_views = TwoViewTransform(view)

    def _fingerprinted_splits(self) -> dict[str, TensorDataset]:
        return self._labelled

    @property
    def eval_split(self) -> str:
        """What the ``"test"`` split holds: ``"test"`` (the source's test images) or
        ``"val"`` (training images held out with ``val_fraction``)."""
        return "val" if self.val_fraction else "test"

    def labelled_dataset(self, split: str) -> TensorDataset:
        """uint8 images and int64 labels of ``"train"`` or ``"test"`` (the held-out
        training images when ``val_fraction`` is set: see :attr:`eval_split`)."""
        self.setup()
        if split not in self._labelled:
            raise ValueError(f"split must be one of {sorted(self._labelled)}, got {split!r}")
        return self._labelled[split]

    def labelled_dataloader(self, split: str) -> DataLoader:
        """An unshuffled loader of :meth:`labelled_dataset` (for probes and kNN)."""
        return self._loader(self.labelled_dataset(split), shuffle=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, C, H, W)`` -> normalised float, no augmentation."""
        self.setup()
        return self.normalize(images.float() / 255.0)

    def views(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 ``(B, C, H, W)`` -> two independently augmented, normalised views."""
        self.setup()
        first, second = self.two_views(images.float() / 255.0)
        return self.normalize(first), self.normalize(second)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self._unlabelled, shuffle=True)

    def val_dataloader(self) -> list[DataLoader]:
        return [self.labelled_dataloader("train"), self.labelled_dataloader("test")]

    def test_dataloader(self) -> DataLoader:
        return self.labelled_dataloader("test")

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, second = batch
        if self._training():
            return (*self.views(images), second)
        return self.preprocess(images), second
