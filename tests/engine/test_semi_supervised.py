"""Semi-supervised training (FixMatch-style, optionally with SAR on pseudo-labels): the
labelled / unlabelled split of the data module, its loader, the training step's arithmetic,
the config checks, and `fit` end to end on tiny data."""

from __future__ import annotations

import copy
import csv
import json
import math
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from tests.data.test_fashion_mnist import write_fake_fashion
from tests.engine.runfixtures import StopAfter, digits_config
from torch import nn
from torch.utils.data import DataLoader

from anchorlearn.engine.config import (
    ConfigError,
    LossConfig,
    OptimConfig,
    SemiConfig,
    load_config,
    parse_config,
)
from anchorlearn.engine.datamodules import (
    ClassificationDataModule,
    CyclingSampler,
    EpochShuffleSampler,
    SemiSupervisedBatch,
)
from anchorlearn.engine.module import SupervisedModule
from anchorlearn.engine.objective import build_objective
from anchorlearn.engine.runner import build_run, evaluate_checkpoint, fit
from anchorlearn.engine.semi import SemiSupervisedModule
from anchorlearn.losses.sar import SemanticAnchorRegularizer

# Lightning's CombinedLoader, iterated here outside a trainer (which silences it), warns
# about a torch deprecation in its own code
pytestmark = pytest.mark.filterwarnings(r"ignore:.*isinstance\(treespec, LeafSpec\)")

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "fmnist_semi").glob("*.yaml"))


def semi_digits(**changes) -> dict:
    """A one-epoch semi-supervised digits config (CE + SAR): 10 % of every class labelled,
    batches of 16 labelled and 3 x 16 unlabelled images."""
    raw = digits_config(
        data={
            "source": "digits",
            "batch_size": 16,
            "labelled_fraction": 0.1,
            "unlabelled_ratio": 3,
        },
        trainer={"max_epochs": 1, "progress": False, "log_every_n_steps": 1},
    )
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            raw.setdefault(section, {})[field] = value
        else:
            raw[section] = value
    return raw


# ---------------------------------------------------------------- data


def digits_module(**kwargs) -> ClassificationDataModule:
    kwargs.setdefault("seed", 0)
    return ClassificationDataModule("digits", batch_size=16, **kwargs)


def positions(dm: ClassificationDataModule, split: str) -> set[int]:
    dm.setup()
    return set(dm._split_positions[split][1].tolist())


def test_labelled_and_unlabelled_parts_partition_the_training_images() -> None:
    full = digits_module()
    semi = digits_module(labelled_fraction=0.1)
    labelled, unlabelled = positions(semi, "train"), positions(semi, "unlabelled")
    assert not labelled & unlabelled
    assert labelled | unlabelled == positions(full, "train")
    assert positions(semi, "val") == positions(full, "val")
    assert positions(semi, "test") == positions(full, "test")
    full_counts = full.train_class_counts
    assert semi.train_class_counts == [round(0.1 * n) for n in full_counts]
    assert semi.image_counts() == {
        "labelled_images": sum(semi.train_class_counts),
        "unlabelled_images": sum(full_counts) - sum(semi.train_class_counts),
    }
    assert full.image_counts() is None
    again = digits_module(labelled_fraction=0.1)
    assert positions(again, "train") == labelled
    assert positions(digits_module(labelled_fraction=0.1, seed=1), "train") != labelled
    # the fingerprint covers both parts; the default module's has no unlabelled split
    assert "unlabelled" in semi.data_fingerprint()["splits"]
    assert set(full.data_fingerprint()["splits"]) == {"train", "val", "test"}


def test_the_loader_yields_a_labelled_and_a_ratio_times_larger_unlabelled_batch() -> None:
    dm = digits_module(labelled_fraction=0.1, unlabelled_ratio=3)
    n_unlabelled = dm.image_counts()["unlabelled_images"]
    steps = -(-n_unlabelled // 48)
    assert dm.train_steps_per_epoch == steps
    loader = dm.train_dataloader()
    batches = list(iter(loader))
    assert len(batches) == len(loader) == steps
    first = batches[0][0] if isinstance(batches[0], tuple) else batches[0]
    assert first["labelled"][0].shape == (16, 1, 8, 8)
    assert first["unlabelled"][0].shape == (48, 1, 8, 8)
    # one pass over the unlabelled images; the labelled ones cycle, every one of them seen
    unlabelled_images = torch.cat(
        [(b[0] if isinstance(b, tuple) else b)["unlabelled"][0] for b in batches]
    )
    assert len(unlabelled_images) == n_unlabelled
    labelled_samplers = [
        dl.sampler for dl in loader.flattened if isinstance(dl.sampler, CyclingSampler)
    ]
    assert len(labelled_samplers) == 1
    order = list(labelled_samplers[0])
    assert len(order) == steps * 16 and set(order) == set(range(len(dm.dataset("train"))))


def test_shuffling_depends_only_on_seed_and_epoch() -> None:
    sampler = CyclingSampler(10, 25, seed=3)
    sampler.set_epoch(2)
    first = list(sampler)
    again = CyclingSampler(10, 25, seed=3)
    again.set_epoch(2)
    assert list(again) == first
    sampler.set_epoch(3)
    assert list(sampler) != first
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:20]) == list(range(10))
    assert len(first) == len(sampler) == 25


def test_labelled_only_mode_takes_the_same_steps_without_unlabelled_batches() -> None:
    semi = digits_module(labelled_fraction=0.1, unlabelled_ratio=3)
    alone = digits_module(labelled_fraction=0.1, unlabelled_ratio=3, unlabelled_batches=False)
    loader = alone.train_dataloader()
    assert isinstance(loader, DataLoader) and isinstance(loader.sampler, CyclingSampler)
    combined = semi.train_dataloader()
    iter(combined)  # a CombinedLoader knows its length once iterated
    assert len(loader) == len(combined) == semi.train_steps_per_epoch
    assert alone.train_class_counts == semi.train_class_counts


def test_the_default_path_is_the_plain_supervised_one() -> None:
    cfg = parse_config(digits_config())
    assert cfg.semi is None and cfg.data.labelled_fraction is None
    assert cfg.data.unlabelled_ratio is None
    dm, module = build_run(cfg)
    assert type(module) is SupervisedModule
    loader = dm.train_dataloader()
    assert isinstance(loader, DataLoader) and isinstance(loader.sampler, EpochShuffleSampler)


def test_views_of_a_semi_supervised_batch() -> None:
    dm = digits_module(labelled_fraction=0.1, unlabelled_ratio=3)
    raw = next(iter(dm.train_dataloader()))
    raw = raw[0] if isinstance(raw, tuple) else raw
    batch = dm.on_after_batch_transfer(raw, 0)
    assert isinstance(batch, SemiSupervisedBatch)
    assert batch.images.shape == (16, 1, 8, 8) and batch.images.dtype == torch.float32
    assert batch.weak.shape == batch.strong.shape == (48, 1, 8, 8)
    assert torch.equal(batch.hidden_labels, raw["unlabelled"][1])
    assert not torch.allclose(batch.weak, batch.strong)


# ---------------------------------------------------------------- the training step


class TinyModel(nn.Module):
    """``features = W x``, ``logits = classifier(features)``: no BatchNorm, so a forward of
    the concatenated batch equals forwards of its parts."""

    def __init__(self, in_dim: int = 4, feat_dim: int = 4, num_classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Linear(in_dim, feat_dim)
        self.classifier = nn.Linear(feat_dim, num_classes)
        self.feat_dim = feat_dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x.flatten(1))
        return self.classifier(features), features


def tiny_module(losses: list[LossConfig], **kwargs) -> SemiSupervisedModule:
    torch.manual_seed(0)
    model = TinyModel()
    objective = build_objective(losses, model=model, num_classes=3, class_counts=[5, 5, 5])
    return SemiSupervisedModule(model, objective, OptimConfig(), num_classes=3, **kwargs)


def tiny_batch(n_labelled: int = 5, n_unlabelled: int = 8) -> SemiSupervisedBatch:
    generator = torch.Generator().manual_seed(1)
    return SemiSupervisedBatch(
        images=torch.randn(n_labelled, 1, 2, 2, generator=generator),
        labels=torch.arange(n_labelled) % 3,
        weak=3 * torch.randn(n_unlabelled, 1, 2, 2, generator=generator),
        strong=torch.randn(n_unlabelled, 1, 2, 2, generator=generator),
        hidden_labels=torch.arange(n_unlabelled) % 3,
    )


def half_threshold(module: SemiSupervisedModule, batch: SemiSupervisedBatch) -> float:
    """A threshold between the 4th and 5th of the 8 sorted weak-view confidences."""
    with torch.no_grad():
        confidence = torch.softmax(module.model(batch.weak)[0], 1).max(1).values.sort().values
    return float((confidence[3] + confidence[4]) / 2)


@pytest.mark.parametrize("weight", [0.0, 1.0, 2.5])
def test_the_loss_matches_a_hand_computation(weight: float) -> None:
    module = tiny_module([LossConfig("ce")], unlabelled_weight=weight)
    batch = tiny_batch()
    module.threshold = half_threshold(module, batch)
    result = module.semi_supervised_loss(batch)

    with torch.no_grad():
        model = module.model
        supervised = F.cross_entropy(model(batch.images)[0], batch.labels)
        weak_probs = torch.softmax(model(batch.weak)[0], 1)
        strong_log_probs = torch.log_softmax(model(batch.strong)[0], 1)
        total, confident = 0.0, []
        for i in range(8):
            p, q = float(weak_probs[i].max()), int(weak_probs[i].argmax())
            if p >= module.threshold:
                confident.append(i)
                total += -float(strong_log_probs[i, q])
        unlabelled = total / 8  # over every unlabelled image, confident or not
    assert len(confident) == 4
    assert result["mask"].tolist() == [i in confident for i in range(8)]
    torch.testing.assert_close(result["unlabelled_loss"].item(), unlabelled)
    torch.testing.assert_close(
        result["loss"].item(), float(supervised) + weight * unlabelled, rtol=1e-6, atol=1e-6
    )
    result["loss"].backward()  # the gradient flows through the strong view only
    assert module.model.body.weight.grad is not None


def test_threshold_one_masks_everything_out_and_zero_keeps_everything() -> None:
    batch = tiny_batch()
    strict = tiny_module([LossConfig("ce")], threshold=1.0).semi_supervised_loss(batch)
    assert not strict["mask"].any() and strict["unlabelled_loss"].item() == 0.0
    loose = tiny_module([LossConfig("ce")], threshold=0.0).semi_supervised_loss(batch)
    assert loose["mask"].all() and loose["unlabelled_loss"].item() > 0


def open_sar_gate(module: SemiSupervisedModule) -> SemanticAnchorRegularizer:
    """Set the classifier so that the projected anchors are classified with p ~ 0.96."""
    ((_, sar),) = module.sar_terms
    with torch.no_grad():
        projected = sar.projected_anchors()
        module.model.classifier.weight.copy_(4.0 * torch.linalg.pinv(projected).T)
        module.model.classifier.bias.zero_()
    return sar


def test_sar_on_confident_unlabelled_features_adds_only_their_pull() -> None:
    losses = [LossConfig("ce"), LossConfig("sar", {"update_conf": 0.8})]
    with_pull = tiny_module(losses, sar_unlabelled=True)
    sar = open_sar_gate(with_pull)
    without = copy.deepcopy(with_pull)
    without.sar_unlabelled = False
    batch = tiny_batch()
    with_pull.threshold = without.threshold = half_threshold(with_pull, batch)

    a = with_pull.semi_supervised_loss(batch)
    b = without.semi_supervised_loss(batch)
    assert bool(a["terms"]["sar/gate_open"]) and float(a["terms"]["sar/pull"]) > 0
    # the semantic anchors, the step counter and the auxiliary CE as without the extra pull:
    # the anchors were updated once, the auxiliary CE computed once
    ((_, sar_b),) = without.sar_terms
    assert int(sar.step) == int(sar_b.step) == 1
    assert torch.equal(sar.semantic_anchors, sar_b.semantic_anchors)
    assert torch.equal(a["terms"]["sar/aux_ce"], b["terms"]["sar/aux_ce"])
    assert "sar/pull_unlabelled" not in b["terms"]

    with torch.no_grad():
        features = with_pull.model(batch.strong)[1][a["mask"]]
        targets = a["pseudo_labels"][a["mask"]]
        anchors = sar.semantic_anchors[targets]
        expected = float(((features - anchors) ** 2).sum(1).mean() / features.shape[1])
    assert int(a["mask"].sum()) == 4 and expected > 0
    torch.testing.assert_close(float(a["terms"]["sar/pull_unlabelled"]), expected)
    torch.testing.assert_close(
        (a["loss"] - b["loss"]).item(), sar.pull_weight * expected, rtol=1e-5, atol=1e-7
    )


def test_the_hidden_labels_never_reach_the_loss() -> None:
    losses = [LossConfig("ce"), LossConfig("sar", {"update_conf": 0.8})]
    clean = tiny_module(losses, sar_unlabelled=True, threshold=0.0)
    open_sar_gate(clean)
    corrupted = copy.deepcopy(clean)
    batch = tiny_batch()
    wrong = batch._replace(hidden_labels=(batch.hidden_labels + 1) % 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer
        loss_clean = clean.training_step(batch, 0)
        loss_corrupted = corrupted.training_step(wrong, 0)
    assert torch.equal(loss_clean, loss_corrupted)
    loss_clean.backward()
    loss_corrupted.backward()
    for (name, p), q in zip(clean.named_parameters(), corrupted.parameters(), strict=True):
        assert p.grad is not None and torch.equal(p.grad, q.grad), name


def test_the_hidden_labels_never_change_a_training_run() -> None:
    """Train the same epoch twice, the second time with every hidden label replaced: the
    weights come out identical."""

    def train(corrupt: bool) -> dict[str, torch.Tensor]:
        cfg = parse_config(semi_digits(semi={"threshold": 0.3}))
        L.seed_everything(0, verbose=False)
        dm, module = build_run(cfg)
        hidden = dm.dataset("unlabelled").tensors[1]
        if corrupt:
            hidden.copy_((hidden + 1 + torch.arange(len(hidden)) % 9) % 10)
        trainer = L.Trainer(
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module, datamodule=dm)
        return {k: v.clone() for k, v in module.state_dict().items()}

    clean, corrupted = train(False), train(True)
    assert clean.keys() == corrupted.keys()
    for key in clean:
        assert torch.equal(clean[key], corrupted[key]), key


def test_a_plain_batch_trains_as_the_supervised_module() -> None:
    module = tiny_module([LossConfig("ce")])
    batch = tiny_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = module.training_step((batch.images, batch.labels), 0)
    expected = F.cross_entropy(module.model(batch.images)[0], batch.labels)
    torch.testing.assert_close(loss, expected)


def test_module_argument_checks() -> None:
    with pytest.raises(ValueError, match=r"threshold must lie in \[0, 1\], got 1.5"):
        tiny_module([LossConfig("ce")], threshold=1.5)
    with pytest.raises(ValueError, match=r"unlabelled_weight must be finite and >= 0, got -1.0"):
        tiny_module([LossConfig("ce")], unlabelled_weight=-1.0)
    with pytest.raises(ValueError, match="the objective has none"):
        tiny_module([LossConfig("ce")], sar_unlabelled=True)


# ---------------------------------------------------------------- config


def test_defaults_are_filled_in_and_stated() -> None:
    cfg = parse_config(semi_digits())
    assert cfg.semi == SemiConfig(threshold=0.95, unlabelled_weight=1.0, sar_unlabelled=True)
    raw = semi_digits(losses=["ce"])
    del raw["data"]["unlabelled_ratio"]
    cfg = parse_config(raw)
    assert cfg.data.unlabelled_ratio == 7
    assert cfg.semi == SemiConfig(sar_unlabelled=False)  # no sar loss
    cfg = parse_config(semi_digits(semi={"unlabelled_weight": 0}))
    assert cfg.semi.sar_unlabelled is False  # no unlabelled batches to pull


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"data__labelled_fraction": 0.0},
            r"^data\.labelled_fraction must be in \(0, 1\], got 0\.0$",
        ),
        (
            {"data__labelled_fraction": 1.5},
            r"^data\.labelled_fraction must be in \(0, 1\], got 1\.5$",
        ),
        ({"data__labelled_fraction": "a"}, r"^data\.labelled_fraction must be a number, got 'a'$"),
        ({"data__unlabelled_ratio": 0}, r"^data\.unlabelled_ratio must be >= 1, got 0$"),
        ({"data__unlabelled_ratio": 2.5}, r"^data\.unlabelled_ratio must be an integer"),
        ({"semi": {"threshold": 1.5}}, r"^semi\.threshold must be in \[0, 1\], got 1\.5$"),
        ({"semi": {"unlabelled_weight": -1}}, r"^semi\.unlabelled_weight must be >= 0"),
        (
            {"semi": {"thresold": 0.9}},
            r"unknown key 'semi\.thresold' \(did you mean 'threshold'\?\)",
        ),
        (
            {"losses": ["ce"], "semi": {"sar_unlabelled": True}},
            r"semi\.sar_unlabelled: true .* add sar to losses",
        ),
        (
            {"semi": {"sar_unlabelled": True, "unlabelled_weight": 0}},
            r"semi\.sar_unlabelled: true needs unlabelled batches.*semi\.unlabelled_weight: 0",
        ),
        (
            {"task": "segmentation"},
            r"^data\.labelled_fraction=0\.1: semi-supervised segmentation needs a data set "
            r"in a standard layout .*not 'digits'",
        ),
        (
            {"data__labelled_fraction": 1},
            r"^data\.labelled_fraction=1(\.0)? labels every training image.*unlabelled_weight: 0",
        ),
    ],
)
def test_config_errors_name_the_key(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(semi_digits(**changes))


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"semi": {"threshold": 0.9}}, "semi"),
        ({"data__unlabelled_ratio": 3}, "data.unlabelled_ratio"),
    ],
)
def test_semi_settings_without_labelled_fraction_are_refused(changes: dict, key: str) -> None:
    raw = digits_config(**changes)
    with pytest.raises(
        ConfigError,
        match=rf"^{key} is for semi-supervised training: it needs data\.labelled_fraction",
    ):
        parse_config(raw)


def test_a_class_without_labels_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    cfg = parse_config(semi_digits(data__labelled_fraction=0.001))
    with pytest.raises(
        ConfigError,
        match=r"data\.labelled_fraction=0\.001 leaves 10 class\(es\) without a labelled image",
    ):
        fit(cfg, tmp_path / "run", quiet=True, plots=False)


def test_all_labelled_with_unlabelled_batches_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"labels every training image"):
        parse_config(semi_digits(data__labelled_fraction=1.0))
    cfg = parse_config(semi_digits(data__labelled_fraction=1.0, semi={"unlabelled_weight": 0}))
    dm, module = build_run(cfg)  # the labelled images alone: a plain supervised run
    assert type(module) is SupervisedModule
    assert len(dm.train_dataloader()) == -(-len(dm.dataset("train")) // 16)


# ---------------------------------------------------------------- fit end to end


def logged(run: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((run / "logs" / "version_0" / "metrics.csv").open()))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_fits_on_fake_fashion_mnist(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "data" / "fashion-mnist").mkdir(parents=True)
    write_fake_fashion(tmp_path / "data" / "fashion-mnist", n=300)
    monkeypatch.setenv("ANCHORLEARN_DATA", str(tmp_path / "data"))
    cfg = load_config(
        path,
        [
            "data.labelled_fraction=0.1",  # 27 training images per class: 3 labelled
            "data.batch_size=8",
            "data.unlabelled_ratio=3",
            "model.kwargs={width: 4, feat_dim: 8}",
            "trainer.max_epochs=1",
            "trainer.progress=false",
            "trainer.log_every_n_steps=1",
        ],
    )
    metrics = fit(cfg, tmp_path / "run", quiet=True, plots=False)
    assert metrics["labelled_images"] == 30 and metrics["unlabelled_images"] == 240
    stored = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert stored["labelled_images"] == 30 and 0.0 <= stored["top1"] <= 1.0
    counts = json.loads((tmp_path / "run" / "class_counts.json").read_text())
    assert counts["total"] == 30 and counts["unlabelled_images"] == 240
    rows = logged(tmp_path / "run")
    steps = {int(r["step"]) for r in rows if r.get("train/loss_step")}
    assert len(steps) == 10  # ceil(240 / (3 * 8)) steps, with or without unlabelled batches
    uses_unlabelled = cfg.semi.unlabelled_weight > 0
    assert any(r.get("train/mask_rate_step") for r in rows) == uses_unlabelled
    if cfg.semi.sar_unlabelled:
        # logged at every step (its value, against a hand computation, is tested above: on
        # random images the gate and the 0.95 threshold do not open within 10 steps)
        pulls = [
            float(r["train/sar/pull_unlabelled"])
            for r in rows
            if r.get("train/sar/pull_unlabelled")
        ]
        assert len(pulls) == 10 and all(math.isfinite(v) and v >= 0 for v in pulls)


def test_the_shipped_configs_differ_only_in_losses_and_semi_settings() -> None:
    configs = {p.stem: load_config(p) for p in CONFIGS}
    assert set(configs) == {"supervised", "supervised_sar", "fixmatch", "fixmatch_sar"}
    for cfg in configs.values():
        assert cfg.data == configs["fixmatch"].data
        assert cfg.optim == configs["fixmatch"].optim and cfg.trainer == configs["fixmatch"].trainer
        assert cfg.data.labelled_fraction == 0.01 and cfg.data.max_train_samples == 12000
    assert configs["supervised"].semi.unlabelled_weight == 0
    assert configs["supervised_sar"].semi.unlabelled_weight == 0
    assert configs["fixmatch_sar"].semi.sar_unlabelled is True
    assert [s.name for s in configs["fixmatch_sar"].losses] == ["ce", "sar"]


def test_resume_reaches_the_same_result_as_an_uninterrupted_run(tmp_path: Path) -> None:
    cfg = parse_config(
        semi_digits(
            semi={"threshold": 0.5},
            trainer={"max_epochs": 2, "progress": False},
        )
    )
    full = fit(cfg, tmp_path / "full", quiet=True, plots=False)
    fit(cfg, tmp_path / "resumed", quiet=True, plots=False, callbacks=[StopAfter(1)])
    resumed = fit(cfg, tmp_path / "resumed", resume=True, quiet=True, plots=False)
    assert resumed["epochs"] == full["epochs"] == 2
    assert resumed["top1"] == pytest.approx(full["top1"], abs=1e-6)
    assert resumed["nc1"] == pytest.approx(full["nc1"], rel=1e-4)
    # the checkpoint rebuilds the semi-supervised run and scores as it did
    scored = evaluate_checkpoint(tmp_path / "full" / "checkpoints" / "last.ckpt")
    assert scored["top1"] == pytest.approx(full["top1"], abs=1e-6)
