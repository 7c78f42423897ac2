"""Semantic segmentation on data sets in their standard layouts (``ade20k:``, ``cityscapes:``,
``pascal_context:``, ``voc:``, ``camvid:``), trained by iterations as the field does.

* Data: :class:`SegmentationFilesDataModule` reads files lazily. Loader workers decode, rescale,
  crop (with a cap on the largest class's share), flip and pad each training sample; the
  training device then converts the batch to float, applies the photometric distortion and
  normalises it with the encoder's mean and std.
* Schedule: ``trainer.max_steps`` optimiser steps as one stream of batches.
  :class:`StepSampler` lays out every sample of the run from ``(seed, position)`` alone, and
  every random choice of a sample (scale, crop, flip, photometric distortion) is drawn from its
  position, so a run resumed from a mid-epoch checkpoint sees exactly the batches the
  uninterrupted run would have seen.
* Validation and test: :func:`run_inference`, an optional rescale to a base size and then
  :func:`anchorlearn.inference.segment` (whole image, sliding window, multi-scale + flip),
  scored at the labels' full size; aAcc, mIoU, mAcc, per-class IoU and accuracy, head / tail
  IoU and feature geometry.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from anchorlearn.data.seg_transforms import (
    PhotometricDistortion,
    RandomRescaleCrop,
    StrongPhotometric,
    cutout_boxes,
    keep_ratio_size,
)
from anchorlearn.data.segmentation_sets import SEGMENTATION_KINDS, open_segmentation
from anchorlearn.inference import scaled_size, segment
from anchorlearn.metrics.geometry import class_centers, feature_geometry
from anchorlearn.metrics.segmentation import SegmentationIoU, format_iou_table
from anchorlearn.models.encoders import IMAGENET_MEAN, IMAGENET_STD

from .config import InferenceConfig, OptimConfig
from .datamodules import SemiSupervisedBatch
from .evaluate import regularizer_state
from .module import SupervisedModule
from .schema import ConfigError

__all__ = [
    "SegmentationFilesDataModule",
    "SegmentationModule",
    "StepCheckpoint",
    "StepSampler",
    "evaluate_segmentation",
    "is_segmentation_dataset",
    "network_input",
    "run_inference",
    "segmentation_groups_by_frequency",
]

IGNORE_INDEX = 255


def is_segmentation_dataset(source: str) -> bool:
    """Whether ``source`` names a data set in a standard layout (``kind:ROOT``)."""
    kind, sep, root = source.partition(":")
    return bool(sep and root) and kind in SEGMENTATION_KINDS


class StepSampler(Sampler[tuple[int, int]]):
    """The training samples of an iteration-based run, as ``(position, index)`` pairs.

    The run reads one stream of samples: position ``p`` holds image
    ``perm(seed, p // N)[p % N]`` (``N`` images, a new permutation every pass). Global batch
    ``j`` is positions ``[j B W, (j + 1) B W)`` (``B`` the per-process batch size, ``W`` the
    number of processes); process ``r`` reads its ``r``-th slice of ``B``. The sampler yields
    the batches ``start_batch .. total_batches - 1`` of this process, so a run resumed after
    ``k`` batches (``start_batch = k``) continues exactly where it stopped. Its length is the
    full ``total_batches * B`` whatever ``start_batch`` is (what Lightning counts an epoch by).
    """

    def __init__(
        self,
        num_samples: int,
        *,
        seed: int,
        batch_size: int,
        total_batches: int,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if not 0 <= start_batch <= total_batches:
            raise ValueError(
                f"start_batch must lie in [0, total_batches={total_batches}], got {start_batch}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
        self.num_samples = num_samples
        self.seed = seed
        self.batch_size = batch_size
        self.total_batches = total_batches
        self.start_batch = start_batch
        self.rank = rank
        self.world_size = world_size
        self._perms: dict[int, list[int]] = {}

    def _permutation(self, epoch: int) -> list[int]:
        order = self._perms.get(epoch)
        if order is None:  # positions are read in order: one pass is cached at a time
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
            self._perms = {epoch: order}
        return order

    def position_index(self, position: int) -> int:
        """The image at stream position ``position``."""
        epoch, offset = divmod(position, self.num_samples)
        return self._permutation(epoch)[offset]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        per_global = self.batch_size * self.world_size
        for batch in range(self.start_batch, self.total_batches):
            first = batch * per_global + self.rank * self.batch_size
            for position in range(first, first + self.batch_size):
                yield position, self.position_index(position)

    def __len__(self) -> int:
        return self.total_batches * self.batch_size


class _StreamLoader(DataLoader):
    """A loader over a :class:`StepSampler`. Its place in the stream comes from the restored
    optimiser step (see ``train_dataloader``); its state is the layout of the stream, which a
    resumed run must share with the checkpoint's."""

    def state_dict(self) -> dict[str, int]:
        sampler = self.sampler
        return {
            "num_samples": sampler.num_samples,
            "seed": sampler.seed,
            "batch_size": sampler.batch_size,
            "world_size": sampler.world_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        changed = {k: (v, state.get(k)) for k, v in self.state_dict().items() if state.get(k) != v}
        if changed:
            detail = "; ".join(f"{k}: {old} -> {new}" for k, (new, old) in changed.items())
            raise ValueError(
                f"cannot resume: the training stream differs from the checkpoint's ({detail}); "
                "the data set or the number of processes changed"
            )


def _position_rng(seed: int, position: int) -> np.random.Generator:
    return np.random.default_rng([seed, position])


class _TrainCrops(Dataset):
    """``dataset[(position, index)]``: image ``index`` rescaled, cropped, flipped and padded by
    ``transform`` with random choices drawn from ``(seed, position)``; returns uint8 image
    ``(3, h, w)``, uint8 mask ``(h, w)``, the position and the ``(height, width)`` of the
    image content (the rest is padding, set to 0 after normalisation)."""

    def __init__(self, dataset: Any, transform: RandomRescaleCrop, seed: int) -> None:
        self.dataset = dataset
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple:
        position, index = key
        image, mask = self.dataset[index]
        image, mask, size = self.transform.crop(image, mask, _position_rng(self.seed, position))
        mask_tensor = torch.from_numpy(mask.astype(np.uint8))
        return _image_tensor(image), mask_tensor, position, torch.tensor(size)


def _image_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


class _Images(Dataset):
    """The samples ``indices`` of a data set (the labelled or the unlabelled part of a
    semi-supervised run's training split)."""

    def __init__(self, dataset: Any, indices: np.ndarray) -> None:
        self.dataset = dataset
        self.indices = [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.dataset[self.indices[i]]

    def read_mask(self, i: int) -> np.ndarray:
        return self.dataset.read_mask(self.indices[i])


class _SemiTrainCrops(Dataset):
    """``dataset[(position, index)]``: the labelled crop of :class:`_TrainCrops` at stream
    position ``position``, then ``ratio`` unlabelled crops: those of the unlabelled stream
    positions ``position * ratio + k`` (``k < ratio``), whose images ``unlabelled_stream``
    lays out as :class:`StepSampler` does and whose random choices come from
    ``(seed, unlabelled position, 1)``. ``transform`` crops them without looking at the
    masks (no class cap); the masks are cropped alongside for logging only.

    Returns the labelled ``(image, mask, position, size)`` and the unlabelled uint8 images
    ``(ratio, 3, h, w)``, masks ``(ratio, h, w)`` and content sizes ``(ratio, 2)``.
    """

    def __init__(
        self,
        labelled: _TrainCrops,
        unlabelled: _Images,
        transform: RandomRescaleCrop,
        unlabelled_stream: StepSampler,
        ratio: int,
        seed: int,
    ) -> None:
        self.labelled = labelled
        self.unlabelled = unlabelled
        self.transform = transform
        self.unlabelled_stream = unlabelled_stream
        self.ratio = ratio
        self.seed = seed

    def __len__(self) -> int:
        return len(self.labelled)

    def __getitem__(self, key: tuple[int, int]) -> tuple:
        position, _ = key
        images, masks, sizes = [], [], []
        for k in range(self.ratio):
            stream = position * self.ratio + k
            image, mask = self.unlabelled[self.unlabelled_stream.position_index(stream)]
            rng = np.random.default_rng([self.seed, stream, 1])
            image, mask, size = self.transform.crop(image, mask, rng)
            images.append(_image_tensor(image))
            masks.append(torch.from_numpy(mask.astype(np.uint8)))
            sizes.append(torch.tensor(size))
        return (
            *self.labelled[key],
            torch.stack(images),
            torch.stack(masks),
            torch.stack(sizes),
        )


class _EvalImages(Dataset):
    """Whole images of a split (optionally a subset): uint8 ``(3, H, W)``, uint8 mask
    ``(H, W)`` and the image's index in the split."""

    def __init__(self, dataset: Any, indices: list[int]) -> None:
        self.dataset = dataset
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        index = self.indices[i]
        image, mask = self.dataset[index]
        return _image_tensor(image), torch.from_numpy(mask.astype(np.uint8)), index


def _file_size(path: Path) -> int:
    """Size in bytes; -1 for a file that cannot be read (it no longer matches the run's)."""
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _as_list(batch: list) -> list:
    return batch


class _MaskOnly(Dataset):
    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        mask = torch.from_numpy(self.dataset.read_mask(i).astype(np.int64)).reshape(-1)
        return torch.bincount(mask, minlength=IGNORE_INDEX + 1)[: IGNORE_INDEX + 1]


class SegmentationFilesDataModule(L.LightningDataModule):
    """Iteration-based segmentation data from :func:`anchorlearn.data.open_segmentation`.

    Args:
        source: ``kind:ROOT`` with kind one of ``ade20k``, ``cityscapes``, ``pascal_context``,
            ``voc``, ``camvid``.
        crop_size: training crop ``(h, w)``.
        base_size: ``(h, w)`` the random rescale is relative to (``None``: each image's own
            size); the scale ratio is drawn from ``ratio_range``.
        ratio_range: ``(low, high)`` of the rescale ratio.
        cat_max_ratio: the largest class may cover at most this share of a crop (up to 10
            redraws; 1 turns the cap off).
        photometric: apply :class:`~anchorlearn.data.seg_transforms.PhotometricDistortion`
            to training batches (on the training device).
        batch_size: training crops per process and step (before gradient accumulation).
        eval_batch_size: whole images per validation / test batch (images of one size are
            stacked; others are run one by one).
        num_workers: loader workers (decoding and cropping happen there).
        seed: the sample stream and every random choice of a sample.
        max_steps: optimiser steps of the run; with ``accumulate_grad_batches`` they define
            the number of training batches.
        splits: names of the ``(train, val, test)`` splits of the data set.
        labelled_fraction: semi-supervised training: the share of the training images whose
            masks are used, ``round(fraction * N)`` images drawn with ``seed`` (the rest are
            unlabelled); ``None``: every image labelled.
        unlabelled_ratio: unlabelled crops per labelled crop in a training batch.
        unlabelled_batches: with ``labelled_fraction``, whether training batches carry
            unlabelled crops (``False``: the labelled images alone, on the same schedule).

    Training batches after :meth:`on_after_batch_transfer`: float ``(B, 3, h, w)`` normalised
    crops and int64 ``(B, h, w)`` masks (255 = ignore); semi-supervised, a
    :class:`~anchorlearn.engine.datamodules.SemiSupervisedBatch` whose ``weak`` view of the
    ``B * unlabelled_ratio`` unlabelled crops is the crop alone (rescale, crop, flip: no
    photometric distortion) and whose ``strong`` view is the weak one through
    :class:`~anchorlearn.data.seg_transforms.StrongPhotometric` and
    :func:`~anchorlearn.data.seg_transforms.cutout_boxes`, pixel-aligned with it. Validation
    and test batches stay lists of ``(uint8 image (3, H, W), uint8 mask (H, W), index)``;
    :meth:`normalize_images` turns images into network input.
    """

    ignore_index = IGNORE_INDEX

    def __init__(
        self,
        source: str,
        *,
        crop_size: tuple[int, int],
        base_size: tuple[int, int] | None = None,
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        photometric: bool = True,
        batch_size: int = 8,
        eval_batch_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        max_steps: int = 1000,
        accumulate_grad_batches: int = 1,
        splits: tuple[str, str, str] = ("train", "val", "test"),
        labelled_fraction: float | None = None,
        unlabelled_ratio: int = 1,
        unlabelled_batches: bool = True,
    ) -> None:
        super().__init__()
        if not is_segmentation_dataset(source):
            raise ValueError(
                f"source must be KIND:ROOT with KIND one of {', '.join(SEGMENTATION_KINDS)}, "
                f"got {source!r}"
            )
        self.source = source
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.base_size = None if base_size is None else (int(base_size[0]), int(base_size[1]))
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))
        self.cat_max_ratio = float(cat_max_ratio)
        self.photometric = bool(photometric)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.max_steps = int(max_steps)
        self.accumulate_grad_batches = int(accumulate_grad_batches)
        self.splits = dict(zip(("train", "val", "test"), splits, strict=True))
        if labelled_fraction is not None and not 0.0 < float(labelled_fraction) <= 1.0:
            raise ValueError(f"labelled_fraction must lie in (0, 1], got {labelled_fraction!r}")
        if int(unlabelled_ratio) < 1:
            raise ValueError(f"unlabelled_ratio must be >= 1, got {unlabelled_ratio!r}")
        self.labelled_fraction = None if labelled_fraction is None else float(labelled_fraction)
        self.unlabelled_ratio = int(unlabelled_ratio)
        self.unlabelled_batches = bool(unlabelled_batches)
        self._parts: tuple[np.ndarray, np.ndarray] | None = None
        self.mean = torch.tensor(IMAGENET_MEAN)
        self.std = torch.tensor(IMAGENET_STD)
        self._datasets: dict[str, Any] = {}
        self._pixel_counts: list[int] | None = None
        self._distortion = PhotometricDistortion()
        self._transform = RandomRescaleCrop(
            self.crop_size,
            base_size=self.base_size,
            ratio_range=self.ratio_range,
            cat_max_ratio=self.cat_max_ratio,
            flip=True,
            ignore_index=IGNORE_INDEX,
        )
        # unlabelled crops: no class cap (it would read the masks)
        self._unlabelled_transform = RandomRescaleCrop(
            self.crop_size,
            base_size=self.base_size,
            ratio_range=self.ratio_range,
            cat_max_ratio=1.0,
            flip=True,
            ignore_index=IGNORE_INDEX,
        )
        self._strong = StrongPhotometric()

    # -- data sets --------------------------------------------------------------------------
    def dataset(self, split: str) -> Any:
        """The data set of ``split`` (``"train"``, ``"val"`` or ``"test"``), opened once."""
        if split not in self.splits:
            raise ValueError(f"split must be one of train, val, test, got {split!r}")
        if split not in self._datasets:
            self._datasets[split] = open_segmentation(self.source, self.splits[split])
        return self._datasets[split]

    def setup(self, stage: str | None = None) -> None:
        """Open every split (file lists only), so that a missing one fails before training;
        draw the labelled images of a semi-supervised run (a fraction that labels none, or
        all with unlabelled batches, fails here)."""
        for split in self.splits:
            self.dataset(split)
        self.train_parts()

    @property
    def semi_supervised(self) -> bool:
        """Whether training batches are
        :class:`~anchorlearn.engine.datamodules.SemiSupervisedBatch` es."""
        return self.labelled_fraction is not None and self.unlabelled_batches

    def train_parts(self) -> tuple[np.ndarray, np.ndarray]:
        """Indices of the labelled and the unlabelled training images (sorted): every image
        labelled without ``labelled_fraction``; else ``round(fraction * N)`` drawn with
        ``np.random.default_rng((seed, 1))``."""
        if self._parts is None:
            n = len(self.dataset("train"))
            if self.labelled_fraction is None:
                self._parts = (np.arange(n), np.empty(0, dtype=np.int64))
                return self._parts
            take = round(self.labelled_fraction * n)
            if take == 0:
                raise ConfigError(
                    f"{self.source}: data.labelled_fraction={self.labelled_fraction} labels "
                    f"round({self.labelled_fraction} * {n}) = 0 of the {n} training images; "
                    f"raise it above {0.5 / n:.3g}"
                )
            if take == n and self.unlabelled_batches:
                raise ConfigError(
                    f"{self.source}: data.labelled_fraction={self.labelled_fraction} labels "
                    f"all {n} training images: no unlabelled image is left for the unlabelled "
                    "batches; use a smaller fraction, or semi.unlabelled_weight: 0 to train "
                    "on the labelled images alone"
                )
            order = np.random.default_rng((self.seed, 1)).permutation(n)
            self._parts = (np.sort(order[:take]), np.sort(order[take:]))
        return self._parts

    def _labelled_train(self) -> Any:
        if self.labelled_fraction is None:
            return self.dataset("train")
        return _Images(self.dataset("train"), self.train_parts()[0])

    def image_counts(self) -> dict[str, int] | None:
        """With ``labelled_fraction``: ``{"labelled_images", "unlabelled_images"}``; else
        ``None``."""
        if self.labelled_fraction is None:
            return None
        labelled, unlabelled = self.train_parts()
        return {"labelled_images": len(labelled), "unlabelled_images": len(unlabelled)}

    def data_fingerprint(self) -> dict[str, Any]:
        """What a run reads, to check later that the data did not change, without reading
        the pixels (an ADE20K-sized data set would take minutes).

        ``{"version", "kind": "files", "source", "splits", "split_indices_sha256"}``: for
        every split its name in the data set, the number of samples and ``content_sha256``,
        the sha256 of one line per sample, ``IMAGE\tSIZE\tANNOTATION\tSIZE\n`` (paths
        relative to the data-set folder, sizes in bytes), the lines sorted. An edit that
        keeps every file's size and name goes unnoticed. The split-index hash covers the
        same paths in the order the samples are indexed (a changed listing order would draw
        other samples).
        """
        splits: dict[str, dict[str, Any]] = {}
        indices = hashlib.sha256()
        for name in ("train", "val", "test"):
            dataset = self.dataset(name)
            lines = [
                "\t".join(f"{os.path.relpath(p, dataset.root)}\t{_file_size(p)}" for p in pair)
                + "\n"
                for pair in dataset.files
            ]
            splits[name] = {
                "split": self.splits[name],
                "samples": len(dataset),
                "content_sha256": hashlib.sha256("".join(sorted(lines)).encode()).hexdigest(),
            }
            indices.update(f"{name}={self.splits[name]}\n".encode())
            for pair in dataset.files:
                indices.update(
                    "\t".join(os.path.relpath(p, dataset.root) for p in pair).encode() + b"\n"
                )
        return {
            "version": 1,
            "kind": "files",
            "source": self.source,
            "splits": splits,
            "split_indices_sha256": indices.hexdigest(),
        }

    @property
    def class_names(self) -> list[str]:
        return list(self.dataset("train").class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def palette(self) -> np.ndarray:
        return self.dataset("train").palette

    in_channels = 3

    @property
    def train_class_pixel_counts(self) -> list[int]:
        """Labelled training pixels per class (full-size masks, ignore excluded; with
        ``labelled_fraction``, of the labelled images only); counted once with the loader
        workers, progress on stderr."""
        if self._pixel_counts is None:
            self._pixel_counts = self._count_pixels(self._labelled_train())
        return self._pixel_counts

    def set_pixel_counts(self, counts: list[int]) -> None:
        """Reuse counts computed before (a resumed run reads them from its run directory)."""
        if len(counts) != self.num_classes:
            raise ValueError(
                f"counts must have {self.num_classes} entries (one per class), got {len(counts)}"
            )
        self._pixel_counts = [int(c) for c in counts]

    def _count_pixels(self, dataset: Any) -> list[int]:
        loader = DataLoader(
            _MaskOnly(dataset), batch_size=8, num_workers=self.num_workers, collate_fn=_as_list
        )
        total = torch.zeros(IGNORE_INDEX + 1, dtype=torch.int64)
        start, done, step = time.perf_counter(), 0, max(len(dataset) // 10, 1)
        for batch in loader:
            for counts in batch:
                total += counts
            done += len(batch)
            if done // step != (done - len(batch)) // step or done == len(dataset):
                print(
                    f"counting training pixels per class: {done}/{len(dataset)} masks "
                    f"({time.perf_counter() - start:.0f} s)",
                    file=sys.stderr,
                )
        return total[: self.num_classes].tolist()

    # -- normalisation ----------------------------------------------------------------------
    def set_normalization(self, mean: Any, std: Any) -> None:
        """Per-channel mean and std (in ``[0, 1]`` units) of the network's input."""
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if self.mean.numel() != 3 or self.std.numel() != 3 or bool((self.std <= 0).any()):
            raise ValueError(f"mean and std must be 3 values, std > 0; got {mean!r}, {std!r}")

    def normalize_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or ``[0, 1]`` float ``(B, 3, H, W)`` -> normalised float32."""
        x = images.float()
        if images.dtype == torch.uint8:
            x = x / 255.0
        mean = self.mean.to(x.device)[None, :, None, None]
        std = self.std.to(x.device)[None, :, None, None]
        return (x - mean) / std

    # -- loaders ----------------------------------------------------------------------------
    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def train_sampler(self, start_batch: int = 0) -> StepSampler:
        rank, world = self._world()
        return StepSampler(
            len(self._labelled_train()),
            seed=self.seed,
            batch_size=self.batch_size,
            total_batches=self.max_steps * self.accumulate_grad_batches,
            start_batch=start_batch,
            rank=rank,
            world_size=world,
        )

    def train_dataloader(self) -> DataLoader:
        # Lightning restores the loop state before it asks for the loader: a resumed run
        # starts after the batches its checkpoint had consumed
        trainer = self.trainer
        start = 0 if trainer is None else int(trainer.global_step) * self.accumulate_grad_batches
        crops: Dataset = _TrainCrops(self._labelled_train(), self._transform, self.seed)
        if self.semi_supervised:
            unlabelled = _Images(self.dataset("train"), self.train_parts()[1])
            # the unlabelled positions follow from the labelled ones (unique across
            # processes): this sampler only lays out their images
            stream = StepSampler(
                len(unlabelled),
                seed=self.seed + 1,
                batch_size=self.batch_size * self.unlabelled_ratio,
                total_batches=self.max_steps * self.accumulate_grad_batches,
            )
            crops = _SemiTrainCrops(
                crops,
                unlabelled,
                self._unlabelled_transform,
                stream,
                self.unlabelled_ratio,
                self.seed,
            )
        return _StreamLoader(
            crops,
            batch_size=self.batch_size,
            sampler=self.train_sampler(start),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=False,
        )

    def eval_dataloader(self, split: str, *, shard: bool = True) -> DataLoader:
        """Whole images of ``split``; with ``shard`` (validation under DDP) every process
        reads its own share (image ``i`` on process ``i % world_size``)."""
        dataset = self.dataset(split)
        rank, world = self._world() if shard else (0, 1)
        indices = list(range(rank, len(dataset), world))
        return DataLoader(
            _EvalImages(dataset, indices),
            batch_size=self.eval_batch_size,
            num_workers=self.num_workers,
            collate_fn=_as_list,
        )

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(
            batch[0], torch.Tensor
        ):  # a training batch: (images, masks, positions, sizes)
            # the batch's randomness on the device (photometric distortion, dropout) follows
            # its first stream position, so that a resumed run repeats it; positions differ
            # between DDP processes
            torch.manual_seed(self.seed * 1_000_003 + int(batch[2][0]))
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not isinstance(batch[0], torch.Tensor):  # validation / test: (image, mask, index)s
            return batch
        images, masks, _, sizes = batch[:4]
        trainer = self.trainer
        if trainer is not None and trainer.training and self.photometric:
            images = self._distortion(images.float() / 255.0)
        # padding is 0 after normalisation (the mean colour), as at inference time
        images = self.normalize_images(images) * _content(sizes, images)[:, None]
        if len(batch) == 4:
            return images, masks.long()
        return self.semi_supervised_views(images, masks, *batch[4:])

    def semi_supervised_views(
        self,
        images: torch.Tensor,
        masks: torch.Tensor,
        unlabelled: torch.Tensor,
        hidden_masks: torch.Tensor,
        sizes: torch.Tensor,
    ) -> SemiSupervisedBatch:
        """The labelled crops (ready) and the uint8 unlabelled crops ``(B, r, 3, h, w)``
        with their masks and content sizes -> a
        :class:`~anchorlearn.engine.datamodules.SemiSupervisedBatch` (see the class
        docstring); draws from torch's global generator."""
        crops = unlabelled.flatten(0, 1).float() / 255.0
        sizes = sizes.flatten(0, 1)
        valid = _content(sizes, crops)
        weak = self.normalize_images(crops) * valid[:, None]
        strong = self.normalize_images(self._strong(crops)) * valid[:, None]
        strong = cutout_boxes(strong)
        return SemiSupervisedBatch(
            images, masks.long(), weak, strong, hidden_masks.flatten(0, 1).long(), valid
        )


def _content(sizes: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """``(B, H, W)`` bool: the pixels of each crop inside its content ``sizes`` ``(B, 2)``
    (the rest is padding)."""
    rows = torch.arange(images.shape[-2], device=images.device)
    cols = torch.arange(images.shape[-1], device=images.device)
    return (rows[None, :, None] < sizes[:, 0, None, None].to(images.device)) & (
        cols[None, None, :] < sizes[:, 1, None, None].to(images.device)
    )


def _group_same_size(batch: list) -> list[tuple[torch.Tensor, torch.Tensor, list[int]]]:
    """Stack the images of a list batch into runs of equal size."""
    groups: list[tuple[list, list, list]] = []
    for image, mask, index in batch:
        if groups and groups[-1][0][0].shape == image.shape:
            groups[-1][0].append(image)
            groups[-1][1].append(mask)
            groups[-1][2].append(int(index))
        else:
            groups.append(([image], [mask], [int(index)]))
    return [(torch.stack(i), torch.stack(m), idx) for i, m, idx in groups]


def network_input(images: torch.Tensor, inference: InferenceConfig) -> torch.Tensor:
    """``images`` rescaled to ``inference.base_size`` (aspect ratio kept), if set."""
    if inference.base_size is None:
        return images
    size = keep_ratio_size(images.shape[-2], images.shape[-1], tuple(inference.base_size))
    if size == tuple(images.shape[-2:]):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def run_inference(
    model: torch.nn.Module, images: torch.Tensor, inference: InferenceConfig
) -> torch.Tensor:
    """Logits ``(B, C, H, W)`` at the size of the normalised ``images`` ``(B, 3, H, W)``:
    :func:`anchorlearn.inference.segment` with the run's settings, after the optional
    rescale to ``inference.base_size``."""
    x = network_input(images, inference)
    logits = segment(
        model,
        x,
        mode=inference.mode,
        crop_size=None if inference.crop_size is None else tuple(inference.crop_size),
        stride=None if inference.stride is None else tuple(inference.stride),
        scales=tuple(inference.scales),
        flip=inference.flip,
    )
    if logits.shape[-2:] != images.shape[-2:]:
        logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return logits


class SegmentationModule(SupervisedModule):
    """:class:`SupervisedModule` for iteration-based segmentation: validation runs the
    configured inference (``inference``) on whole images and logs ``val/miou``,
    ``val/aacc`` and ``val/macc``; ``channels_last`` keeps the model and its input in
    channels-last memory format."""

    def __init__(
        self,
        model: torch.nn.Module,
        objective: Any,
        optim: OptimConfig,
        *,
        num_classes: int,
        inference: InferenceConfig,
        seed: int = 0,
        channels_last: bool = False,
    ) -> None:
        super().__init__(
            model,
            objective,
            optim,
            task="segmentation",
            num_classes=num_classes,
            ignore_index=IGNORE_INDEX,
            seed=seed,
        )
        self.inference = inference
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.val_iou = SegmentationIoU(num_classes, IGNORE_INDEX)

    def on_train_epoch_start(self) -> None:
        """No per-epoch reseeding: every batch's randomness follows its stream position."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        images, labels = batch
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return super().training_step((images, labels), batch_idx)

    def validation_step(self, batch: list, batch_idx: int) -> None:
        dm = self.trainer.datamodule
        for images, masks, _ in _group_same_size(batch):
            logits = run_inference(self.model, dm.normalize_images(images), self.inference)
            self.val_iou.update(logits, masks)

    def on_validation_epoch_end(self) -> None:
        """Log mIoU, aAcc and mAcc of the whole split: each process scored its own images
        (unpadded shards), the confusion matrices are summed over the ranks first, so every
        rank logs the same global values (their ``sync_dist`` mean is those values again)."""
        if self.trainer.world_size > 1:
            total = self.trainer.strategy.reduce(self.val_iou.confusion, reduce_op="sum")
            self.val_iou.confusion.copy_(total)
        result = self.val_iou.compute()
        for key in ("miou", "aacc", "macc"):
            self.log(f"val/{key}", result[key], prog_bar=key == "miou", sync_dist=True)
        self.val_iou.reset()


def segmentation_groups_by_frequency(pixel_counts: list[int]) -> dict[int, str]:
    """``head``: the more frequent half of the classes by training pixels; ``tail``: the rest."""
    order = np.argsort(-np.asarray(pixel_counts), kind="stable")
    half = (len(order) + 1) // 2
    return {int(c): ("head" if rank < half else "tail") for rank, c in enumerate(order)}


def _geometry_sample(
    features: torch.Tensor, masks: torch.Tensor, per_image: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``per_image`` labelled positions per image of ``features`` ``(B, D, h, w)``, the
    labels resized to ``(h, w)`` by nearest neighbour; only the chosen feature vectors leave
    the device."""
    small = F.interpolate(masks[:, None].float(), size=features.shape[-2:], mode="nearest")
    labels = small[:, 0].long().reshape(-1).cpu()
    keep = torch.nonzero(labels != IGNORE_INDEX).flatten()
    limit = per_image * features.shape[0]
    if keep.numel() > limit:
        keep = keep[torch.randperm(keep.numel(), generator=generator)[:limit]]
    b, h, w = features.shape[0], features.shape[-2], features.shape[-1]
    index = keep.to(features.device)
    picked = features.permute(0, 2, 3, 1).reshape(b * h * w, -1)[index]
    return picked.float().cpu(), labels[keep]


def _geometry_input(
    images: torch.Tensor, inference: InferenceConfig, *, nearest: bool = False
) -> torch.Tensor:
    """What the features for the geometry metrics are computed on: the network's input at
    the first scale (whole mode) or its central crop of ``crop_size`` (slide mode).
    ``nearest``: resample a label map the same way."""
    mode = "nearest" if nearest else "bilinear"
    corners = None if nearest else False
    if inference.base_size is not None:
        size = keep_ratio_size(images.shape[-2], images.shape[-1], tuple(inference.base_size))
        if size != tuple(images.shape[-2:]):
            images = F.interpolate(images, size=size, mode=mode, align_corners=corners)
    if inference.mode == "slide" and inference.crop_size is not None:
        h, w = images.shape[-2:]
        ch, cw = min(inference.crop_size[0], h), min(inference.crop_size[1], w)
        top, left = (h - ch) // 2, (w - cw) // 2
        return images[..., top : top + ch, left : left + cw]
    scale = inference.scales[0]
    if scale == 1.0:
        return images
    size = scaled_size(images.shape[-2], images.shape[-1], scale)
    return F.interpolate(images, size=size, mode=mode, align_corners=corners)


def _logits_and_features(
    model: torch.nn.Module, x: torch.Tensor, inference: InferenceConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`run_inference`'s logits of normalised ``x`` and the features of
    :func:`_geometry_input`. With one scale, no flip and whole images the two come from
    one forward pass, resized exactly as :func:`run_inference` resizes them."""
    if inference.mode == "whole" and len(inference.scales) == 1 and not inference.flip:
        logits, features = model(_geometry_input(x, inference))
        for size in (network_input(x, inference).shape[-2:], x.shape[-2:]):
            if logits.shape[-2:] != size:
                logits = F.interpolate(
                    logits.float(), size=size, mode="bilinear", align_corners=False
                )
        return logits.float(), features
    _, features = model(_geometry_input(x, inference))
    return run_inference(model, x, inference), features


@torch.no_grad()
def evaluate_segmentation(
    module: SupervisedModule,
    dm: SegmentationFilesDataModule,
    *,
    split: str = "test",
    inference: InferenceConfig | None = None,
    save_masks: str | Path | None = None,
    max_points: int = 20_000,
    progress: bool = True,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Score ``module`` on a whole ``split`` with ``inference`` (default: the module's).

    Returns ``(metrics, sample)``: aAcc, mIoU, mAcc (fractions), per-class IoU and accuracy,
    head / tail IoU (by training pixel frequency), feature geometry and class centres; and
    up to ``max_points`` labelled feature positions with their labels (for plots). With
    ``save_masks`` every prediction is written as a colour PNG named after its image.
    """
    from anchorlearn.viz.masks import save_mask_png

    inference = inference or module.inference
    was_training = module.training
    module.eval()
    dataset = dm.dataset(split)
    loader = dm.eval_dataloader(split, shard=False)
    per_image = max(max_points // max(len(dataset), 1), 1)
    generator = torch.Generator().manual_seed(0)
    names = dm.class_names
    groups = segmentation_groups_by_frequency(dm.train_class_pixel_counts)
    iou = SegmentationIoU(module.num_classes, IGNORE_INDEX, [groups[c] for c in range(len(names))])
    feats, labels = [], []
    out_dir = None if save_masks is None else Path(save_masks)
    start, done = time.perf_counter(), 0
    for batch in loader:
        for images, masks, indices in _group_same_size(batch):
            x = dm.normalize_images(images.to(module.device))
            logits, features = _logits_and_features(module.model, x, inference)
            preds = logits.argmax(1).cpu()
            iou.update(preds, masks)
            geometry_masks = _geometry_input(masks[:, None].float(), inference, nearest=True)
            f, y = _geometry_sample(features, geometry_masks[:, 0], per_image, generator)
            feats.append(f)
            labels.append(y)
            if out_dir is not None:
                for pred, index in zip(preds, indices, strict=True):
                    name = Path(dataset.image_path(index)).stem + ".png"
                    save_mask_png(out_dir / name, pred.numpy(), dm.palette)
            done += len(indices)
        if progress and (done % 50 < len(batch) or done == len(dataset)):
            print(
                f"evaluating {split}: {done}/{len(dataset)} images "
                f"({time.perf_counter() - start:.0f} s)",
                file=sys.stderr,
            )
    module.train(was_training)
    result = iou.compute()
    metrics: dict[str, Any] = {k: result[k] for k in ("miou", "aacc", "macc")}
    for group in ("head", "tail"):
        metrics[f"{group}_iou"] = _num(result[f"miou_{group}"])
    metrics["per_class"] = {n: _num(v) for n, v in zip(names, result["iou"].tolist(), strict=True)}
    metrics["per_class_acc"] = {
        n: _num(v) for n, v in zip(names, result["acc"].tolist(), strict=True)
    }
    metrics["groups"] = {names[c]: g for c, g in sorted(groups.items())}
    metrics.update(regularizer_state(module))
    sample = {"features": torch.cat(feats), "labels": torch.cat(labels)}
    geometry = feature_geometry(sample["features"], sample["labels"])
    metrics.update({k: _num(v) for k, v in geometry.items()})
    metrics["class_centers"] = class_centers(sample["features"], sample["labels"]).tolist()
    metrics["class_center_labels"] = torch.unique(sample["labels"]).tolist()
    metrics["inference"] = {
        "mode": inference.mode,
        "base_size": inference.base_size,
        "crop_size": inference.crop_size,
        "stride": inference.stride,
        "scales": list(inference.scales),
        "flip": inference.flip,
    }
    if progress:
        print(format_iou_table(names, result), file=sys.stderr)
    return metrics, sample


def _num(value: Any) -> float | None:
    value = float(value)
    return None if value != value else value


class StepCheckpoint(L.Callback):
    """Writes the checkpoint ``path`` every ``every_n_steps`` optimiser steps and when training
    ends, so that an interrupted iteration-based run resumes mid-epoch. The final write
    happens even right after a periodic one: under DDP the BatchNorm statistics are averaged
    over the processes at the end (and before validation), after the last periodic write."""

    def __init__(self, path: str | Path, every_n_steps: int) -> None:
        self.path = Path(path)
        self.every_n_steps = int(every_n_steps)

    def _save(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)  # the full training state

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if (
            step > 0
            and step % self.every_n_steps == 0
            and not trainer.fit_loop._should_accumulate()
        ):
            self._save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer)
