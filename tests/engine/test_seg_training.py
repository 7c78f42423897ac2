"""Iteration-based segmentation training on tiny copies of the standard layouts."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from tests.data.segfixtures import make_ade20k, make_camvid, make_cityscapes

from anchorlearn.cli import main
from anchorlearn.engine.config import ConfigError, InferenceConfig, OptimConfig, parse_config
from anchorlearn.engine.module import lr_factor, parameter_groups
from anchorlearn.engine.runner import RunError, build_run, evaluate_checkpoint, fit
from anchorlearn.engine.segmentation import (
    SegmentationFilesDataModule,
    StepSampler,
    _logits_and_features,
    run_inference,
)


def seg_config(source: str, **changes) -> dict:
    raw = {
        "name": "seg",
        "task": "segmentation",
        "data": {"source": source, "crop_size": [32, 48], "batch_size": 2},
        "model": {"name": "seg_net", "kwargs": {"width": 4, "feat_dim": 8}},
        "losses": ["ce", {"name": "sar", "update_conf": 0.3}],
        "optim": {"name": "adamw", "lr": 0.003, "schedule": "poly", "warmup_steps": 2},
        "trainer": {"max_steps": 6, "val_every_n_steps": 3, "progress": False},
        "inference": {"batch_size": 2},
    }
    for key, value in changes.items():
        section, _, field = key.partition("__")
        raw[section][field] = value
    return raw


@pytest.fixture(scope="module")
def camvid(tmp_path_factory) -> str:
    return "camvid:" + str(make_camvid(tmp_path_factory.mktemp("data")))


# -- the sample stream ---------------------------------------------------------------------
def test_step_sampler_resumes_exactly_and_ranks_split_each_global_batch() -> None:
    kwargs = {"seed": 3, "batch_size": 4, "total_batches": 7}
    full = list(StepSampler(10, **kwargs))
    assert len(full) == 28
    # passes over the data are permutations: every image once per pass
    assert sorted(i for _, i in full[:10]) == list(range(10))
    assert [p for p, _ in full] == list(range(28))
    resumed = list(StepSampler(10, start_batch=5, **kwargs))
    assert resumed == full[20:]
    assert len(StepSampler(10, start_batch=5, **kwargs)) == 28  # Lightning's epoch length
    ranks = [list(StepSampler(10, rank=r, world_size=2, **kwargs)) for r in range(2)]
    for batch in range(7):
        together = ranks[0][batch * 4 : batch * 4 + 4] + ranks[1][batch * 4 : batch * 4 + 4]
        assert [p for p, _ in together] == list(range(batch * 8, batch * 8 + 8))
    assert full != list(StepSampler(10, seed=4, batch_size=4, total_batches=7))


def test_step_sampler_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="start_batch"):
        StepSampler(5, seed=0, batch_size=2, total_batches=3, start_batch=4)
    with pytest.raises(ValueError, match="rank"):
        StepSampler(5, seed=0, batch_size=2, total_batches=3, rank=2, world_size=2)


# -- schedule and optimiser ----------------------------------------------------------------
def test_poly_schedule_with_warmup_and_floor() -> None:
    cfg = OptimConfig(lr=0.01, schedule="poly", poly_power=0.9, min_lr=1e-4, warmup_steps=10)
    factors = [lr_factor(s, total=110, warmup=10, cfg=cfg) for s in range(110)]
    assert factors[:3] == pytest.approx([0.1, 0.2, 0.3])
    assert factors[9] == pytest.approx(1.0)
    for step in (10, 35, 60, 109):
        t = (step - 10) / 100
        expected = 0.01 + 0.99 * (1 - t) ** 0.9  # min_lr / lr = 0.01
        assert factors[step] == pytest.approx(expected)
    assert lr_factor(110, total=110, warmup=10, cfg=cfg) == pytest.approx(0.01)


def test_backbone_learning_rate_multiplier(tmp_path: Path) -> None:
    source = "ade20k:" + str(make_ade20k(tmp_path))
    raw = seg_config(source, optim__backbone_lr_mult=0.1, optim__schedule="constant")
    raw["data"]["test_split"] = "val"
    raw["optim"].pop("warmup_steps")
    raw["model"] = {"name": "mlp_head", "kwargs": {"encoder": "resnet50", "channels": 16}}
    cfg = parse_config(raw)
    _, module = build_run(cfg)
    groups = {g["name"]: g for g in module.configure_optimizers().param_groups}
    assert groups["backbone"]["lr"] == pytest.approx(0.0003)
    assert groups["head"]["lr"] == pytest.approx(0.003)
    encoder = {id(p) for p in module.model.encoder.parameters()}
    assert {id(p) for p in groups["backbone"]["params"]} == encoder
    # the head and SAR's projector train at the full rate
    sar = module.objective.terms[1]
    head_ids = {id(p) for p in groups["head"]["params"]}
    assert {id(p) for p in sar.parameters()} <= head_ids
    assert {id(p) for p in module.model.head.parameters()} <= head_ids


def test_backbone_multiplier_needs_a_model_with_a_backbone(camvid: str) -> None:
    raw = seg_config(camvid, optim__backbone_lr_mult=0.1)
    _, module = build_run(parse_config(raw))
    with pytest.raises(ValueError, match="backbone_lr_mult"):
        module.configure_optimizers()


# -- configs -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {
                "trainer__max_steps": None,
                "trainer__val_every_n_steps": None,
                "optim__warmup_steps": 0,
            },
            "train by iterations: set trainer.max_steps",
        ),
        ({"data__crop_size": None}, "needs data.crop_size"),
        ({"optim__warmup_epochs": 1}, "optim.warmup_epochs is for epoch-based runs"),
        ({"optim__warmup_steps": 6}, r"warmup_steps \(6\) must be below"),
        ({"data__crop_size": [32]}, "data.crop_size must be a list of two ints"),
        ({"data__ratio_range": [2.0, 0.5]}, "data.ratio_range"),
        ({"inference__mode": "slide"}, "needs inference.crop_size and inference.stride"),
        ({"inference__crop_size": [32, 32]}, "remove them for mode whole"),
        ({"task": "classification"}, "is a segmentation data set"),
    ],
)
def test_inconsistent_settings_are_config_errors(camvid: str, changes: dict, message: str):
    raw = seg_config(camvid)
    for key, value in changes.items():
        if key == "task":
            raw["task"] = value
            continue
        section, _, field = key.partition("__")
        raw[section][field] = value
    with pytest.raises(ConfigError, match=message):
        build_run(parse_config(raw))


def test_max_steps_is_refused_for_epoch_based_sources() -> None:
    raw = {"data": {"source": "digits"}, "trainer": {"max_steps": 5}}
    with pytest.raises(ConfigError, match="trains by epochs"):
        build_run(parse_config(raw))


def test_a_wrong_root_or_a_missing_split_is_a_one_line_run_error(tmp_path: Path) -> None:
    with pytest.raises(RunError, match=str(tmp_path / "nowhere")):
        build_run(parse_config(seg_config(f"cityscapes:{tmp_path / 'nowhere'}")))
    source = "ade20k:" + str(make_ade20k(tmp_path))
    with pytest.raises(RunError, match=r"no split 'test'.*data.test_split='test'"):
        build_run(parse_config(seg_config(source)))


# -- end to end ------------------------------------------------------------------------------
class _CrashAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def _weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return ckpt["state_dict"]


@pytest.mark.parametrize("photometric", [True, False])
def test_fit_validates_and_checkpoints_by_steps_and_resumes_mid_epoch(
    camvid: str, tmp_path: Path, photometric: bool
) -> None:
    # dropout (seg_net's, before its classifier) draws from the generator in both cases
    raw = seg_config(camvid, trainer__checkpoint_every_n_steps=2, data__photometric=photometric)
    cfg = parse_config(raw)
    full = fit(cfg, tmp_path / "full", quiet=True, plots=False)
    assert full["steps"] == 6
    for key in ("miou", "aacc", "macc", "head_iou", "tail_iou", "nc1", "sar_gate_open_step"):
        assert key in full, key
    assert 0.0 <= full["miou"] <= 1.0
    assert set(full["per_class"]) == set(full["per_class_acc"]) == {
        "sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car",
        "pedestrian", "bicyclist",
    }  # fmt: skip
    rows = (tmp_path / "full" / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    val_steps = [
        int(float(r.split(",")[header.index("step")]))
        for r in rows[1:]
        if r.split(",")[header.index("val/miou")]
    ]
    assert len(val_steps) == 2  # after steps 3 and 6

    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(cfg, crashed, quiet=True, plots=False, callbacks=[_CrashAt(5)])
    # the crash came after step 5; the last checkpoint is the one of step 4
    assert torch.load(crashed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    resumed = fit(cfg, crashed, resume=True, quiet=True, plots=False)
    assert resumed["steps"] == 6
    expected, got = _weights(tmp_path / "full"), _weights(crashed)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
    assert resumed["miou"] == full["miou"]


def test_eval_cli_slide_flip_and_masks(camvid: str, tmp_path: Path, capsys) -> None:
    cfg = parse_config(seg_config(camvid, trainer__max_steps=3))
    fit(cfg, tmp_path / "run", quiet=True, plots=False)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    masks, out = tmp_path / "masks", tmp_path / "eval.json"
    argv = ["eval", "--checkpoint", str(ckpt), "--mode", "slide", "--crop-size", "32,48"]
    argv += ["--stride", "16,24", "--flip", "--save-masks", str(masks), "--out", str(out)]
    assert main(argv) == 0
    metrics = json.loads(out.read_text())
    assert metrics["inference"] == {
        "mode": "slide",
        "base_size": None,
        "crop_size": [32, 48],
        "stride": [16, 24],
        "scales": [1.0],
        "flip": True,
    }  # fmt: skip
    written = sorted(masks.glob("*.png"))
    assert len(written) == len(list((Path(camvid[7:]) / "test").glob("*.png")))
    picture = np.asarray(Image.open(written[0]))
    assert picture.shape == (64, 96, 3)
    palette = {tuple(int(v) for v in c) for c in build_run(cfg)[0].palette}
    assert {tuple(c) for c in picture.reshape(-1, 3).tolist()} <= palette
    assert "miou" in capsys.readouterr().out
    # back to whole images: the sliding windows of a slide override are dropped
    whole = evaluate_checkpoint(ckpt, inference={"mode": "whole", "flip": False})
    assert whole["inference"]["mode"] == "whole" and whole["inference"]["crop_size"] is None
    assert main(["eval", "--checkpoint", str(ckpt), "--no-flip", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["inference"]["flip"] is False


def test_eval_refuses_inference_settings_for_classification_runs(tmp_path: Path) -> None:
    raw = {"data": {"source": "digits"}, "model": {"kwargs": {"width": 4, "feat_dim": 8}}}
    raw["trainer"] = {"max_epochs": 1, "progress": False}
    fit(parse_config(raw), tmp_path / "run", quiet=True, plots=False)
    with pytest.raises(RunError, match="apply to segmentation data sets"):
        evaluate_checkpoint(
            tmp_path / "run" / "checkpoints" / "last.ckpt", inference={"flip": True}
        )


def test_cityscapes_label_ids_train_with_accumulation(tmp_path: Path) -> None:
    source = "cityscapes:" + str(make_cityscapes(tmp_path, train_ids=False))
    raw = seg_config(source, trainer__max_steps=2, trainer__accumulate_grad_batches=2)
    raw["trainer"].pop("val_every_n_steps")
    raw["optim"]["warmup_steps"] = 1
    raw["data"]["test_split"] = "val"  # Cityscapes' test labels are not public
    cfg = parse_config(raw)
    metrics = fit(cfg, tmp_path / "run", quiet=True, plots=False)
    assert metrics["steps"] == 2
    assert len(metrics["per_class"]) == 19
    # two optimiser steps of two batches each: the stream holds four batches
    dm, _ = build_run(cfg)
    assert dm.train_sampler().total_batches == 4


def test_sync_batchnorm_on_cpu_processes_is_refused_before_training(
    camvid: str, tmp_path: Path
) -> None:
    raw = seg_config(camvid, trainer__sync_batchnorm=True, trainer__devices=2)
    with pytest.raises(RunError, match="sync_batchnorm needs GPUs"):
        fit(parse_config(raw), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_etf_wrapped_segmentor_keeps_its_backbone_group_and_normalisation(tmp_path: Path) -> None:
    source = "ade20k:" + str(make_ade20k(tmp_path))
    raw = seg_config(source, optim__backbone_lr_mult=0.5, data__test_split="val")
    raw["model"] = {
        "name": "mlp_head",
        "kwargs": {"encoder": "efficientnet_lite0", "channels": 160},  # ETF: D >= C = 150
        "etf_classifier": True,
    }
    raw["losses"] = ["ce"]
    cfg = parse_config(raw)
    dm, module = build_run(cfg)
    # the Lite0 weights' normalisation, not the ImageNet default
    assert dm.mean.tolist() == [0.5, 0.5, 0.5] and dm.std.tolist() == [0.5, 0.5, 0.5]
    groups = {g["name"]: g for g in parameter_groups(module, cfg.optim)}
    assert groups["backbone"]["lr"] == pytest.approx(0.0015)
    encoder = {id(p) for p in module.model.backbone.encoder.parameters()}
    assert {id(p) for p in groups["backbone"]["params"]} == encoder
    assert {id(p) for p in module.model.norm.parameters()} <= {
        id(p) for p in groups["head"]["params"]
    }


def test_training_padding_is_zero_after_normalisation(camvid: str) -> None:
    dm = SegmentationFilesDataModule(camvid, crop_size=(4, 5), photometric=False)
    dm.set_normalization((0.2, 0.4, 0.6), (0.5, 0.5, 0.5))
    images = torch.full((2, 3, 4, 5), 255, dtype=torch.uint8)
    masks = torch.zeros(2, 4, 5, dtype=torch.uint8)
    sizes = torch.tensor([[4, 5], [2, 3]])
    x, y = dm.on_after_batch_transfer([images, masks, torch.tensor([0, 1]), sizes], 0)
    expected = (1.0 - torch.tensor([0.2, 0.4, 0.6])) / 0.5
    torch.testing.assert_close(x[0], expected[:, None, None].expand(3, 4, 5))
    torch.testing.assert_close(x[1, :, :2, :3], expected[:, None, None].expand(3, 2, 3))
    assert x[1, :, 2:].abs().max() == 0 and x[1, :, :, 3:].abs().max() == 0
    assert y.dtype == torch.int64


@pytest.mark.parametrize(
    "inference",
    [
        InferenceConfig(scales=[0.75]),
        InferenceConfig(base_size=[56, 100], scales=[0.6]),
        InferenceConfig(base_size=[80, 140], scales=[1.0, 0.5], flip=True),
    ],
)
def test_one_pass_evaluation_equals_the_inference_it_stands_for(inference) -> None:
    from anchorlearn.models import create_model

    model = create_model("mlp_head", num_classes=4, encoder="efficientnet_lite0", channels=8)
    model.eval()
    x = torch.randn(2, 3, 61, 93)
    logits, features = _logits_and_features(model, x, inference)
    torch.testing.assert_close(logits, run_inference(model, x, inference))
    assert logits.shape == (2, 4, 61, 93)
    assert features.shape[1] == 8


def test_eval_reuses_the_pixel_counts_its_run_wrote(camvid: str, tmp_path: Path, monkeypatch):
    cfg = parse_config(seg_config(camvid, trainer__max_steps=3))
    fit(cfg, tmp_path / "run", quiet=True, plots=False)
    counts = json.loads((tmp_path / "run" / "class_counts.json").read_text())
    assert counts["train_class_counts"]["sky"] > 0

    def no_counting(self, dataset):
        raise AssertionError("counted the training masks again")

    monkeypatch.setattr(SegmentationFilesDataModule, "_count_pixels", no_counting)
    metrics = evaluate_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert set(metrics["groups"].values()) == {"head", "tail"}


RELEASE_CONFIGS = sorted(
    str(p)
    for folder in ("ade20k", "cityscapes", "pascal_context")
    for p in (Path(__file__).parents[2] / "configs" / folder).glob("*.yaml")
)
FIXTURES = {"ade20k": make_ade20k, "cityscapes": make_cityscapes, "pascal_context": None}


@pytest.mark.parametrize("path", RELEASE_CONFIGS)
def test_release_configs_train_a_few_steps_on_fixture_trees(path: str, tmp_path: Path) -> None:
    """The release's settings, with what a CPU test cannot afford scaled down: HRNet-W18 for
    W48, 64x64 crops, test images at their own size, no ImageNet download, one process,
    2 steps."""
    from tests.data.segfixtures import make_pascal_context

    from anchorlearn.engine.config import load_config

    kind = Path(path).parent.name
    make = FIXTURES[kind] or make_pascal_context
    root = make(tmp_path)
    overrides = [
        f"data.source={kind}:{root}",
        "data.crop_size=[64, 64]",
        "data.batch_size=2",
        "data.num_workers=0",
        "model.kwargs.encoder=hrnet_w18",
        "model.kwargs.encoder_weights=null",
        "trainer.max_steps=2",
        "trainer.val_every_n_steps=2",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.precision=32-true",
        "trainer.progress=false",
    ]
    assert load_config(path).inference.base_size is not None  # the release rescales
    overrides.append("inference.base_size=null")
    if "slide" in Path(path).read_text():
        overrides += ["inference.crop_size=[48, 48]", "inference.stride=[32, 32]"]
    cfg = load_config(path, overrides)
    assert cfg.model.name == "fcn" and cfg.model.kwargs["dropout"] == 0.0
    metrics = fit(cfg, tmp_path / "run", quiet=True, plots=False)
    assert metrics["steps"] == 2 and 0.0 <= metrics["miou"] <= 1.0
    assert ("sar_gate_open_step" in metrics) == ("_sar" in Path(path).stem)


@pytest.mark.parametrize(("precision", "channels_last"), [("bf16-mixed", False), ("32-true", True)])
def test_mixed_precision_and_channels_last_train(
    camvid: str, tmp_path: Path, precision: str, channels_last: bool
) -> None:
    raw = seg_config(
        camvid, trainer__max_steps=3, trainer__precision=precision,
        trainer__channels_last=channels_last, trainer__log_every_n_steps=1,
    )  # fmt: skip
    raw["model"] = {"name": "mlp_head", "kwargs": {"encoder": "efficientnet_lite0", "channels": 8}}
    cfg = parse_config(raw)
    _, module = build_run(cfg)
    conv = module.model.encoder.conv_stem.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last
    metrics = fit(cfg, tmp_path / "run", quiet=True, plots=False)
    assert metrics["steps"] == 3 and 0.0 <= metrics["miou"] <= 1.0
    rows = (tmp_path / "run" / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    losses = [r.split(",")[rows[0].split(",").index("train/loss_step")] for r in rows[1:]]
    losses = [float(v) for v in losses if v]
    assert len(losses) == 3 and all(np.isfinite(losses))


def test_sar_plus_is_refused_for_segmentation(camvid: str) -> None:
    raw = seg_config(camvid)
    raw["losses"] = ["ce", "sar_plus"]
    with pytest.raises(ConfigError, match="sar_plus is for classification"):
        parse_config(raw)


def test_sar_class_weights_by_name_count_the_training_pixels(camvid: str) -> None:
    """A file-based segmentation set counts its masks only when a loss needs the counts:
    SAR's class-balanced pull, named in the config, is one."""
    from anchorlearn.engine.runner import build_run

    raw = seg_config(camvid)
    raw["losses"] = ["ce", {"name": "sar", "class_weights": "inverse"}]
    _, module = build_run(parse_config(raw))
    weights = module.objective.terms[1].class_weights
    assert weights is not None and weights.shape == (11,)
    assert torch.isfinite(weights).all() and weights.max() > weights.min()


def test_ceco_trains_on_dense_features_and_its_centre_ce_falls(camvid: str, tmp_path: Path) -> None:
    """CeCo (the centre-classification baseline of configs/scenes/ce_ceco.yaml) on a
    segmentation run: it reads the decoder's feature map, its centre CE is logged at every
    step and decreases over the run (the class centres move towards their ETF rows)."""
    raw = seg_config(camvid)
    raw["losses"] = ["ce", {"name": "ceco", "weight": 1.0}]
    raw["model"]["kwargs"]["feat_dim"] = 16  # an 11-class ETF needs >= 10 dimensions
    raw["trainer"].update({"max_steps": 12, "val_every_n_steps": 12, "log_every_n_steps": 1})
    metrics = fit(parse_config(raw), tmp_path / "run", quiet=True, plots=False)
    assert metrics["steps"] == 12 and 0.0 <= metrics["miou"] <= 1.0
    rows = (tmp_path / "run" / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    column = header.index("train/ceco/center_ce")
    logged = [float(r.split(",")[column]) for r in rows[1:] if r.split(",")[column]]
    assert len(logged) == 12 and all(np.isfinite(logged))
    assert np.mean(logged[-4:]) < np.mean(logged[:4])
