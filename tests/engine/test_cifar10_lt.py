"""CIFAR-10-LT end to end on tiny colour trees: the shipped recipe's configs, the step
schedule and LDAM's deferred re-weighting as a run sees them."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
from tests.data.cifarfixtures import make_cifar_batches, make_cifar_folders

from anchorlearn.data.cifar import CIFAR10_CLASSES
from anchorlearn.engine.config import ConfigError, OptimConfig, load_config, parse_config
from anchorlearn.engine.module import lr_factor
from anchorlearn.engine.runner import fit
from anchorlearn.engine.ssl_config import parse_pretrain_config

CONFIGS = sorted(
    str(p) for p in (Path(__file__).parents[2] / "configs" / "cifar10_lt").glob("*.yaml")
)
TINY = [
    "data.batch_size=16",
    "data.val_fraction=0.2",
    "trainer.max_epochs=2",
    "optim.warmup_epochs=1",
    "optim.milestones=[1]",
    "trainer.progress=false",
    "eval.plots=false",
]


def test_the_shipped_recipe_is_the_published_one() -> None:
    assert {Path(p).stem for p in CONFIGS} == {
        "ce",
        "ce_sar",
        "ce_ema_prototype",
        "logit_adjusted",
        "logit_adjusted_sar",
        "balanced_softmax_sar",
        "ldam_drw",
    }
    for path in CONFIGS:
        cfg = load_config(path)
        assert cfg.model.name == "resnet32" and cfg.data.imbalance_ratio == 100
        assert cfg.data.source.startswith("cifar10:") and cfg.data.batch_size == 128
        assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.1, 0.9, 2e-4)
        assert (cfg.optim.schedule, cfg.optim.milestones, cfg.optim.gamma) == (
            "step",
            [160, 180],
            0.01,
        )
        assert cfg.optim.warmup_epochs == 5 and cfg.trainer.max_epochs == 200
    ldam = load_config(next(p for p in CONFIGS if p.endswith("ldam_drw.yaml")))
    assert ldam.model.kwargs == {"cosine_classifier": True}
    assert ldam.losses[0].params["drw_start_epoch"] == 160


# the other configs combine the same pieces (their losses train in the Fashion-MNIST tests)
TRAINED = [p for p in CONFIGS if Path(p).stem in ("ce_sar", "ldam_drw")]


@pytest.mark.parametrize("path", TRAINED, ids=lambda p: Path(p).stem)
def test_shipped_configs_train_on_a_colour_fixture(path: str, tmp_path: Path) -> None:
    root = make_cifar_batches(tmp_path / "data", per_class=4)
    overrides = [f"data.source=cifar10:{root}", "data.imbalance_ratio=4", *TINY]
    metrics = fit(load_config(path, overrides), tmp_path / "run", quiet=True, plots=False)
    assert 0.0 <= metrics["top1"] <= 1.0 and metrics["epochs"] == 2
    assert ("sar_gate_open_step" in metrics) == ("_sar" in Path(path).stem)


def test_image_folders_train_too(tmp_path: Path) -> None:
    root = make_cifar_folders(tmp_path / "data", per_class=6, test_per_class=2)
    cfg = load_config(CONFIGS[0], [f"data.source=cifar10:{root}", *TINY])
    metrics = fit(cfg, tmp_path / "run", quiet=True, plots=False)
    assert sorted(metrics["per_class"]) == sorted(CIFAR10_CLASSES)
    assert 0.0 <= metrics["top1"] <= 1.0


def test_the_step_schedule_multiplies_by_gamma_at_each_milestone() -> None:
    cfg = OptimConfig(schedule="step", milestones=[2, 4], gamma=0.1)
    factors = [lr_factor(s, total=60, warmup=3, cfg=cfg, steps_per_unit=10) for s in range(60)]
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])  # warm-up first
    assert factors[3:20] == pytest.approx([1.0] * 17)
    assert factors[20:40] == pytest.approx([0.1] * 20)
    assert factors[40:] == pytest.approx([0.01] * 20)


def test_the_run_applies_the_milestones_and_the_reweighting_per_epoch(
    tmp_path: Path, capfd
) -> None:
    root = make_cifar_batches(tmp_path / "data", per_class=4)
    path = next(p for p in CONFIGS if p.endswith("ldam_drw.yaml"))
    overrides = [
        f"data.source=cifar10:{root}",
        "data.imbalance_ratio=4",
        "data.batch_size=16",
        "data.val_fraction=0.2",
        "trainer.max_epochs=3",
        "optim.warmup_epochs=0",
        "optim.milestones=[1, 2]",
        "losses.0.drw_start_epoch=2",
        "trainer.progress=false",
    ]
    recorder = _Reweighting()
    fit(
        load_config(path, overrides),
        tmp_path / "run",
        quiet=False,
        plots=False,
        callbacks=[recorder],
    )
    assert recorder.seen == [(0, False), (1, False), (2, True)]
    _, err = capfd.readouterr()
    lines = [
        dict(x.split("=", 1) for x in line.split())
        for line in err.splitlines()
        if line.startswith("epoch=")
    ]
    rates = [float(line["lr"]) for line in lines]
    assert rates == pytest.approx([0.1, 0.001, 1e-5])


class _Reweighting(L.Callback):
    """(epoch, whether LDAM re-weights) at each training epoch's first batch."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, bool]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            loss = pl_module.objective.terms[0]
            self.seen.append((loss.epoch, loss.reweighting))


@pytest.mark.parametrize(
    ("optim", "trainer", "message"),
    [
        ({"schedule": "step"}, {}, "optim.schedule step needs optim.milestones"),
        ({"milestones": [3]}, {}, "optim.milestones are for optim.schedule step"),
        ({"schedule": "step", "milestones": [5, 3]}, {}, "must increase"),
        ({"schedule": "step", "milestones": [10]}, {}, r"lie in 1..9 \(the run has 10 epochs"),
        (
            {"schedule": "step", "milestones": [100]},
            {"max_steps": 50},
            r"lie in 1..49 \(the run has 50 steps",
        ),
        ({"schedule": "step", "milestones": [2], "gamma": 0.0}, {}, "optim.gamma"),
        ({"schedule": "step", "milestones": [True]}, {}, "milestones.0 must be an integer"),
        (
            {"schedule": "step", "milestones": [2, 5], "warmup_epochs": 3},
            {},
            r"must not fall inside the warm-up \(3 epochs\)",
        ),
    ],
)
def test_bad_milestones_are_config_errors(optim: dict, trainer: dict, message: str) -> None:
    raw = {"optim": optim, "trainer": {"max_epochs": 10, **trainer}}
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


def test_pretraining_refuses_milestones_it_would_ignore() -> None:
    with pytest.raises(ConfigError, match=r"optim\.milestones are for optim\.schedule step"):
        parse_pretrain_config({"method": "moco", "optim": {"milestones": [2]}})
