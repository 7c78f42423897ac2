"""The ``model.split_bn`` option of pretraining: config checks and a tiny run with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.engine.test_ssl import tiny_config

from anchorlearn.engine import ssl_runner
from anchorlearn.engine.schema import ConfigError
from anchorlearn.engine.ssl_config import parse_pretrain_config
from anchorlearn.engine.ssl_runner import load_pretrain_checkpoint, pretrain
from anchorlearn.models.moco import MoCo
from anchorlearn.models.split_bn import SplitBatchNorm2d


def test_split_bn_defaults_to_off_and_accepts_a_divisor_of_the_batch() -> None:
    assert parse_pretrain_config(tiny_config("moco")).model.split_bn == 0
    assert parse_pretrain_config(tiny_config("moco", model={"split_bn": 8})).model.split_bn == 8


@pytest.mark.parametrize(
    "model, data, message",
    [
        ({"split_bn": 1}, {}, r"model\.split_bn must be 0 \(off\) or an int >= 2, got 1"),
        ({"split_bn": -2}, {}, r"model\.split_bn must be 0 \(off\) or an int >= 2, got -2"),
        ({"split_bn": 3}, {}, r"model\.split_bn=3 must divide data\.batch_size=64"),
        ({"split_bn": 4}, {"batch_size": 30}, r"model\.split_bn=4 must divide .*=30"),
        ({"split_bn": 2.0}, {}, r"model\.split_bn"),
    ],
)
def test_bad_split_bn_is_a_one_line_config_error(model: dict, data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_pretrain_config(tiny_config("moco", model=model, data=data))
    assert "\n" not in str(info.value)


def test_tiny_moco_run_with_split_bn_trains_and_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = parse_pretrain_config(tiny_config("moco", model={"split_bn": 4}))
    built: list[MoCo] = []

    def recorded_moco(*args, **kwargs) -> MoCo:
        model = MoCo(*args, **kwargs)  # as the runner builds it, split_bn included
        built.append(model)
        return model

    monkeypatch.setattr(ssl_runner, "MoCo", recorded_moco)
    metrics = pretrain(cfg, tmp_path / "run", quiet=True)
    assert 0.0 <= metrics["linear_probe"] <= 1.0
    (model,) = built
    layers = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert layers and all(isinstance(m, SplitBatchNorm2d) and m.num_splits == 4 for m in layers)
    # 256 samples / batch 64: 4 steps moved every layer's statistics
    assert all(int(m.num_batches_tracked) == 4 for m in layers)
    ckpt = load_pretrain_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    state = ckpt["state_dict"]
    # the keys of an ordinary BatchNorm2d: a model without split_bn loads the checkpoint
    plain = MoCo(
        model.encoder_q.backbone.__class__(**cfg.model.kwargs),
        model.encoder_q.feat_dim,
        dim=cfg.model.dim,
        queue_size=cfg.model.queue_size,
    )
    plain.encoder_q.backbone.classifier = torch.nn.Identity()
    plain.encoder_k.backbone.classifier = torch.nn.Identity()
    moco_state = {k.removeprefix("moco."): v for k, v in state.items() if k.startswith("moco.")}
    plain.load_state_dict(moco_state)
    trained = model.encoder_k.backbone.body[0][1]
    assert isinstance(trained, SplitBatchNorm2d)
    assert torch.equal(plain.encoder_k.backbone.body[0][1].running_mean, trained.running_mean)


def test_build_pretrain_run_passes_split_bn_to_moco() -> None:
    _, module = ssl_runner.build_pretrain_run(
        parse_pretrain_config(tiny_config("moco", model={"split_bn": 2}))
    )
    assert module.moco.split_bn == 2
    assert any(isinstance(m, SplitBatchNorm2d) for m in module.moco.modules())
