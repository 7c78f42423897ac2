"""Semi-supervised segmentation (FixMatch per pixel, optionally SAR's pull on confident
pixels) on a tiny CamVid tree: the labelled / unlabelled parts, the pixel-aligned views, the
per-pixel loss, the config checks, and `fit` with resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tests.data.segfixtures import make_camvid
from tests.engine.test_seg_training import _CrashAt, seg_config

from anchorlearn.data.seg_transforms import StrongPhotometric, cutout_boxes
from anchorlearn.engine import segmentation
from anchorlearn.engine.config import (
    ConfigError,
    InferenceConfig,
    LossConfig,
    OptimConfig,
    parse_config,
)
from anchorlearn.engine.datamodules import SemiSupervisedBatch
from anchorlearn.engine.objective import build_objective
from anchorlearn.engine.runner import build_run, fit
from anchorlearn.engine.segmentation import (
    IGNORE_INDEX,
    SegmentationFilesDataModule,
    SegmentationModule,
)
from anchorlearn.engine.semi import SemiSupervisedSegmentationModule
from anchorlearn.models.segmentation import SmallUNet


@pytest.fixture(scope="module")
def camvid(tmp_path_factory) -> str:
    return "camvid:" + str(make_camvid(tmp_path_factory.mktemp("data")))


def semi_seg_config(source: str, **changes) -> dict:
    raw = seg_config(source)
    raw["data"].update({"labelled_fraction": 0.5, "unlabelled_ratio": 2})
    raw["semi"] = {"threshold": 0.0}  # every valid pixel confident: the tiny net is unsure
    raw["trainer"].update({"max_steps": 4, "val_every_n_steps": 2})
    for key, value in changes.items():
        section, _, field = key.partition("__")
        raw.setdefault(section, {})[field] = value
    return raw


def _datamodule(source: str, **kwargs) -> SegmentationFilesDataModule:
    args = {"crop_size": (32, 48), "batch_size": 2, "max_steps": 3, "seed": 0}
    dm = SegmentationFilesDataModule(source, **{**args, **kwargs})
    dm.setup()
    return dm


# -- data ------------------------------------------------------------------------------------
def test_labelled_and_unlabelled_parts_partition_the_training_images(camvid: str) -> None:
    dm = _datamodule(camvid, labelled_fraction=0.5)
    labelled, unlabelled = dm.train_parts()
    assert len(labelled) == 2 and len(unlabelled) == 2  # round(0.5 * 4)
    assert sorted([*labelled, *unlabelled]) == [0, 1, 2, 3]
    assert dm.image_counts() == {"labelled_images": 2, "unlabelled_images": 2}
    # the draw depends on the seed alone
    again = _datamodule(camvid, labelled_fraction=0.5)
    np.testing.assert_array_equal(again.train_parts()[0], labelled)
    # every image labelled without a fraction
    full = _datamodule(camvid)
    assert full.train_parts()[0].tolist() == [0, 1, 2, 3] and full.image_counts() is None
    assert not full.semi_supervised


def test_pixel_counts_are_those_of_the_labelled_images_only(camvid: str) -> None:
    dm = _datamodule(camvid, labelled_fraction=0.5)
    train = dm.dataset("train")
    expected = np.zeros(dm.num_classes, dtype=np.int64)
    for index in dm.train_parts()[0]:
        mask = train.read_mask(int(index)).reshape(-1).astype(np.int64)
        expected += np.bincount(mask, minlength=256)[: dm.num_classes]
    assert dm.train_class_pixel_counts == expected.tolist()
    assert sum(dm.train_class_pixel_counts) < sum(_datamodule(camvid).train_class_pixel_counts)


def test_a_fraction_that_labels_no_image_or_all_of_them_is_a_config_error(camvid: str) -> None:
    with pytest.raises(ConfigError, match=r"labelled_fraction=0\.1 labels round\(0\.1 \* 4\) = 0"):
        _datamodule(camvid, labelled_fraction=0.1)
    with pytest.raises(ConfigError, match=r"labels all 4 training images.*unlabelled_weight: 0"):
        _datamodule(camvid, labelled_fraction=0.9)
    # without unlabelled batches, labelling everything is the supervised run
    assert (
        _datamodule(camvid, labelled_fraction=0.9, unlabelled_batches=False)
        .train_parts()[1]
        .tolist()
        == []
    )
    with pytest.raises(ValueError, match="unlabelled_ratio must be >= 1"):
        _datamodule(camvid, labelled_fraction=0.5, unlabelled_ratio=0)


def _first_batch(dm: SegmentationFilesDataModule):
    raw = next(iter(dm.train_dataloader()))
    torch.manual_seed(0)
    return raw, dm.on_after_batch_transfer(dm.on_before_batch_transfer(raw, 0), 0)


def test_a_semi_batch_holds_labelled_crops_and_ratio_unlabelled_views(camvid: str) -> None:
    dm = _datamodule(camvid, labelled_fraction=0.5, unlabelled_ratio=2)
    raw, batch = _first_batch(dm)
    assert isinstance(batch, SemiSupervisedBatch)
    assert batch.images.shape == (2, 3, 32, 48) and batch.labels.shape == (2, 32, 48)
    assert batch.weak.shape == batch.strong.shape == (4, 3, 32, 48)
    assert batch.hidden_labels.shape == batch.valid.shape == (4, 32, 48)
    assert batch.valid.dtype == torch.bool and batch.valid.all()  # no crop needs padding
    assert not torch.equal(batch.weak, batch.strong)
    # the labelled stream reads the labelled images only; the unlabelled crops come from
    # the unlabelled stream (a new permutation per pass, seeded apart from the labelled one)
    loader = dm.train_dataloader()
    crops = loader.dataset
    labelled, unlabelled = dm.train_parts()
    assert crops.labelled.dataset.indices == labelled.tolist()
    assert crops.unlabelled.indices == unlabelled.tolist()
    assert len(loader.sampler) == 3 * 2  # max_steps x batch size, labelled crops
    # the same batch again: every choice follows the stream positions
    again_raw, again = _first_batch(dm)
    for a, b in zip(raw, again_raw, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(batch, again, strict=True):
        assert torch.equal(a, b)


def test_padding_is_invalid_and_zero_in_both_views(camvid: str) -> None:
    # images rescaled to 0.25-0.4 of 64x96 are smaller than the 32x48 crop: padded
    dm = _datamodule(camvid, labelled_fraction=0.5, ratio_range=(0.25, 0.4))
    _, batch = _first_batch(dm)
    assert (~batch.valid).any() and batch.valid.any()
    outside = ~batch.valid[:, None].expand_as(batch.weak)
    assert (batch.weak[outside] == 0).all() and (batch.strong[outside] == 0).all()
    assert (batch.hidden_labels[~batch.valid] == IGNORE_INDEX).all()


class _Remasked:
    """A training split whose masks are replaced (all void, or another image's)."""

    def __init__(self, dataset, mode: str) -> None:
        self.dataset, self.mode = dataset, mode

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, mask = self.dataset[i]
        if self.mode == "void":
            return image, np.full_like(mask, IGNORE_INDEX)
        return image, self.dataset[(i + 1) % len(self.dataset)][1]


@pytest.mark.parametrize("mode", ["void", "shifted"])
def test_the_unlabelled_masks_never_shape_the_views(camvid: str, mode: str) -> None:
    # the labelled crops have a class cap (0.75 by default), which reads their masks; the
    # unlabelled crops must not: other masks give the same views
    dm = _datamodule(camvid, labelled_fraction=0.5, unlabelled_ratio=2, cat_max_ratio=0.5)
    _, batch = _first_batch(dm)
    loader = dm.train_dataloader()
    loader.dataset.unlabelled.dataset = _Remasked(dm.dataset("train"), mode)
    raw = next(iter(loader))
    torch.manual_seed(0)
    other = dm.on_after_batch_transfer(dm.on_before_batch_transfer(raw, 0), 0)
    for field in ("images", "labels", "weak", "strong", "valid"):
        assert torch.equal(getattr(batch, field), getattr(other, field)), field
    assert not torch.equal(batch.hidden_labels, other.hidden_labels)


def test_the_weak_view_is_the_crop_and_the_strong_view_only_recolours_it(
    camvid: str, monkeypatch
) -> None:
    dm = _datamodule(camvid, labelled_fraction=0.5, unlabelled_ratio=1)
    raw = next(iter(dm.train_dataloader()))
    crops = raw[4].flatten(0, 1).float() / 255.0
    torch.manual_seed(0)
    batch = dm.on_after_batch_transfer(raw, 0)
    torch.testing.assert_close(batch.weak, dm.normalize_images(crops) * batch.valid[:, None])
    # with every strong change off (and no cut-out), the strong view is the weak one
    dm._strong = StrongPhotometric(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    monkeypatch.setattr(segmentation, "cutout_boxes", lambda images: images)
    plain = dm.on_after_batch_transfer(raw, 0)
    torch.testing.assert_close(plain.strong, plain.weak)


def test_strong_photometric_and_cutout() -> None:
    torch.manual_seed(0)
    images = torch.rand(6, 3, 20, 24)
    out = StrongPhotometric()(images)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    assert not torch.equal(out, images)
    off = StrongPhotometric(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    torch.testing.assert_close(off(images), images)
    grey = StrongPhotometric(jitter_p=0.0, grayscale_p=1.0, blur_p=0.0)(images)
    assert torch.allclose(grey[:, 0], grey[:, 1]) and torch.allclose(grey[:, 1], grey[:, 2])
    with pytest.raises(ValueError, match=r"blur_sigma must satisfy 0 < low <= high"):
        StrongPhotometric(blur_sigma=(2.0, 1.0))
    with pytest.raises(TypeError, match=r"images must be a float tensor \(B, 3, H, W\)"):
        off(torch.zeros(2, 1, 4, 4))

    boxed = cutout_boxes(images + 1.0, p=1.0, area=(0.1, 0.2))
    covered = (boxed == 0).all(dim=1).flatten(1).sum(1).float() / (20 * 24)
    # one box per image, its area in range up to rounding and clipping at the border
    assert (covered > 0.04).all() and (covered < 0.3).all()
    assert torch.equal(cutout_boxes(images, p=0.0), images)
    with pytest.raises(ValueError, match="area must satisfy"):
        cutout_boxes(images, area=(0.5, 0.1))


# -- the training step -----------------------------------------------------------------------
def _module(threshold: float = 0.0, sar_unlabelled: bool = True, weight: float = 1.0):
    torch.manual_seed(0)
    model = SmallUNet(num_classes=4, in_channels=3, width=4, feat_dim=8)
    objective = build_objective(
        [LossConfig("ce"), LossConfig("sar", {"update_conf": 0.0})],
        model=model,
        num_classes=4,
        class_counts=None,
        ignore_index=IGNORE_INDEX,
    )
    return SemiSupervisedSegmentationModule(
        model,
        objective,
        OptimConfig(),
        num_classes=4,
        inference=InferenceConfig(),
        threshold=threshold,
        unlabelled_weight=weight,
        sar_unlabelled=sar_unlabelled,
    )


def _batch(valid: torch.Tensor | None = None, hidden: torch.Tensor | None = None):
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 16, 24, generator=generator)
    labels = torch.randint(0, 4, (2, 16, 24), generator=generator)
    weak = torch.randn(3, 3, 16, 24, generator=generator)
    strong = weak + 0.3 * torch.randn(3, 3, 16, 24, generator=generator)
    if hidden is None:
        hidden = torch.randint(0, 4, (3, 16, 24), generator=generator)
    if valid is None:
        valid = torch.ones(3, 16, 24, dtype=torch.bool)
    return SemiSupervisedBatch(images, labels, weak, strong, hidden, valid)


def test_the_per_pixel_loss_matches_a_hand_computation() -> None:
    module = _module(threshold=0.5, sar_unlabelled=False, weight=2.0)
    module.train()
    valid = torch.ones(3, 16, 24, dtype=torch.bool)
    valid[:, 8:] = False  # the lower half is padding
    batch = _batch(valid)
    torch.manual_seed(5)  # the same dropout draws in both forward passes
    result = module.semi_supervised_loss(batch)
    torch.manual_seed(5)
    logits, _ = module.model(torch.cat([batch.images, batch.weak, batch.strong]))
    _, weak, strong = logits.split([2, 3, 3])
    confidence, pseudo = weak.softmax(1).max(1)
    small_valid = F.interpolate(valid[:, None].float(), size=weak.shape[-2:])[:, 0].bool()
    mask = (confidence >= 0.5) & small_valid
    per_pixel = F.cross_entropy(strong, pseudo, reduction="none")
    expected = (per_pixel * mask).sum() / small_valid.sum()
    torch.testing.assert_close(result["unlabelled_loss"], expected)
    assert torch.equal(result["mask"], mask) and torch.equal(result["valid"], small_valid)
    # padding is never confident, and nothing but padding gives no loss
    assert not result["mask"][~small_valid].any()
    empty = module.semi_supervised_loss(_batch(torch.zeros(3, 16, 24, dtype=torch.bool)))
    assert float(empty["unlabelled_loss"].detach()) == 0.0 and not empty["mask"].any()


def _open_sar_gate(module: SemiSupervisedSegmentationModule) -> None:
    """Set the 1x1 classifier so that the projected anchors are classified with p ~ 0.96."""
    ((_, sar),) = module.sar_terms
    with torch.no_grad():
        weight = 4.0 * torch.linalg.pinv(sar.projected_anchors()).T
        module.model.classifier.weight.copy_(weight[:, :, None, None])
        module.model.classifier.bias.zero_()


def test_sar_pulls_the_confident_pixels_and_hidden_masks_never_reach_the_loss() -> None:
    module = _module(threshold=0.0)
    _open_sar_gate(module)
    module.train()
    batch = _batch()
    torch.manual_seed(5)
    first = module.semi_supervised_loss(batch)
    assert bool(first["terms"]["sar/gate_open"])
    # threshold 0: every pixel pulled towards the semantic anchor of its pseudo-label
    ((_, sar),) = module.sar_terms
    with torch.no_grad():
        torch.manual_seed(5)
        _, features = module.model(torch.cat([batch.images, batch.weak, batch.strong]))
        strong = features[5:].permute(0, 2, 3, 1).reshape(-1, features.shape[1])
        anchors = sar.semantic_anchors[first["pseudo_labels"].reshape(-1)]
        expected = ((strong - anchors) ** 2).sum(1).mean() / features.shape[1]
    assert float(expected) > 0
    torch.testing.assert_close(first["terms"]["sar/pull_unlabelled"], expected)

    again = _module(threshold=0.0)
    _open_sar_gate(again)
    again.train()
    torch.manual_seed(5)
    hidden = torch.zeros(3, 16, 24, dtype=torch.long)
    other = again.semi_supervised_loss(_batch(hidden=hidden))
    torch.testing.assert_close(other["loss"], first["loss"], rtol=0, atol=0)
    # a threshold no pixel reaches leaves none to pull
    strict = _module(threshold=1.0)
    _open_sar_gate(strict)
    strict.train()
    terms = strict.semi_supervised_loss(batch)["terms"]
    assert bool(terms["sar/gate_open"]) and float(terms["sar/pull_unlabelled"]) == 0.0


def test_sar_without_an_ignore_index_is_refused_for_the_pixel_pull() -> None:
    model = SmallUNet(num_classes=4, in_channels=3, width=4, feat_dim=8)
    objective = build_objective(
        [LossConfig("ce"), LossConfig("sar")],
        model=model,
        num_classes=4,
        class_counts=None,
        ignore_index=None,
    )
    with pytest.raises(ValueError, match=r"sar has none: build it with ignore_index=255"):
        SemiSupervisedSegmentationModule(
            model,
            objective,
            OptimConfig(),
            num_classes=4,
            inference=InferenceConfig(),
            sar_unlabelled=True,
        )


# -- configs and runs ------------------------------------------------------------------------
def test_config_defaults_and_errors(camvid: str) -> None:
    cfg = parse_config(semi_seg_config(camvid, data__unlabelled_ratio=None))
    assert cfg.data.unlabelled_ratio == 1 and cfg.semi.sar_unlabelled is True
    with pytest.raises(ConfigError, match=r"needs a data set in a standard layout.*'scenes'"):
        parse_config(
            {
                "name": "scenes",
                "task": "segmentation",
                "data": {"source": "scenes", "labelled_fraction": 0.5},
                "losses": ["ce"],
            }
        )


def test_modules_and_the_supervised_baseline(camvid: str) -> None:
    dm, module = build_run(parse_config(semi_seg_config(camvid)))
    assert isinstance(module, SemiSupervisedSegmentationModule) and dm.semi_supervised
    baseline = semi_seg_config(camvid, semi__unlabelled_weight=0.0)
    dm, module = build_run(parse_config(baseline))
    assert type(module) is SegmentationModule and not dm.semi_supervised
    assert dm.image_counts() == {"labelled_images": 2, "unlabelled_images": 2}
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert isinstance(batch, tuple) and len(batch) == 2


def test_fit_logs_the_pseudo_labels_and_resumes_exactly(camvid: str, tmp_path: Path) -> None:
    raw = semi_seg_config(camvid, trainer__checkpoint_every_n_steps=2)
    raw["trainer"]["log_every_n_steps"] = 1
    cfg = parse_config(raw)
    full = fit(cfg, tmp_path / "full", quiet=True, plots=False)
    assert full["steps"] == 4
    assert full["labelled_images"] == 2 and full["unlabelled_images"] == 2
    header = (tmp_path / "full" / "logs" / "version_0" / "metrics.csv").read_text().split("\n")[0]
    for key in ("train/mask_rate_step", "train/pseudo_acc", "train/unlabelled_loss_step"):
        assert key in header.split(","), key
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(cfg, crashed, quiet=True, plots=False, callbacks=[_CrashAt(3)])
    resumed = fit(cfg, crashed, resume=True, quiet=True, plots=False)
    assert resumed["steps"] == 4
    load = lambda run: torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)  # noqa: E731
    expected, got = load(tmp_path / "full")["state_dict"], load(crashed)["state_dict"]
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


SEMI_CONFIGS = sorted(
    str(p) for p in (Path(__file__).parents[2] / "configs" / "camvid_semi").glob("*.yaml")
)


def test_the_shipped_configs_differ_only_in_losses_and_semi_settings() -> None:
    from anchorlearn.engine.config import config_to_dict, load_config

    assert [Path(p).stem for p in SEMI_CONFIGS] == [
        "fixmatch", "fixmatch_sar", "supervised", "supervised_sar",
    ]  # fmt: skip
    dicts = [config_to_dict(load_config(p)) for p in SEMI_CONFIGS]
    for d in dicts:
        assert d["data"]["labelled_fraction"] == 0.125
        for key in ("name", "losses", "semi"):
            d.pop(key)
    assert all(d == dicts[0] for d in dicts[1:])


@pytest.mark.parametrize("path", SEMI_CONFIGS)
def test_every_shipped_config_trains_a_few_steps_on_a_fixture_tree(
    path: str, camvid: str, tmp_path: Path
) -> None:
    """The shipped settings with what a CPU test cannot afford scaled down: 64x64 crops, no
    ImageNet download, half of the 4 fixture images labelled, 2 steps."""
    from anchorlearn.engine.config import load_config

    cfg = load_config(
        path,
        [
            f"data.source={camvid}",
            "data.crop_size=[64, 64]",
            "data.batch_size=2",
            "data.labelled_fraction=0.5",
            "model.kwargs.encoder_weights=null",
            "optim.warmup_steps=1",
            "trainer.max_steps=2",
            "trainer.val_every_n_steps=2",
        ],
    )
    _, module = build_run(cfg)
    assert isinstance(module, SemiSupervisedSegmentationModule) == Path(path).stem.startswith(
        "fixmatch"
    )
    metrics = fit(cfg, tmp_path / "run", quiet=True, plots=False)
    assert metrics["steps"] == 2 and metrics["labelled_images"] == 2
    assert 0.0 <= metrics["miou"] <= 1.0
