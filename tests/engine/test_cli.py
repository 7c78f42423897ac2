"""The `anchorlearn` command line over the engine: `fit` and `eval`, one-line errors for
broken configs and flags, and `--help` of every command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tests.engine.runfixtures import digits_config

from anchorlearn.cli import main


def test_cli_fit_and_eval(tmp_path: Path, capsys) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(digits_config(trainer={"max_epochs": 1})))
    out = tmp_path / "run"
    assert main(["fit", "--config", str(config), "--out", str(out), "--set", "seed=3"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 3
    assert main(["eval", "--checkpoint", str(out / "checkpoints" / "last.ckpt")]) == 0
    assert "top1" in capsys.readouterr().out
    assert main(["eval", str(out / "checkpoints" / "last.ckpt")]) == 0  # or as the argument
    assert "top1" in capsys.readouterr().out
    assert main(["eval", str(out)]) == 0  # or the run folder, standing for its last.ckpt
    assert "top1" in capsys.readouterr().out
    assert main(["eval", str(tmp_path)]) == 2  # a folder that is not a run
    assert f"{tmp_path} is a folder without checkpoints/last.ckpt" in capsys.readouterr().err
    val_json = tmp_path / "val.json"
    ckpt = str(out / "checkpoints" / "last.ckpt")
    assert main(["eval", "--checkpoint", ckpt, "--split", "val", "--out", str(val_json)]) == 0
    assert json.loads(val_json.read_text())["split"] == "val"


def test_cli_negative_seed_is_a_config_error(tmp_path: Path, capsys) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(digits_config()))
    assert main(["fit", "--config", str(config), "--out", str(tmp_path / "r"), "--seed", "-1"]) == 2
    assert "seed must be >= 0, got -1" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_cli_config_typo_is_one_line(tmp_path: Path, capsys) -> None:
    config = tmp_path / "cfg.yaml"
    raw = digits_config()
    raw["trainer"]["max_epoch"] = 3
    config.write_text(yaml.safe_dump(raw))
    assert main(["fit", "--config", str(config), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "trainer.max_epoch" in err and "max_epochs" in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: [1,\n", "is not valid YAML: expected the node content"),
        ("a: 1\n  b: 2\n", "is not valid YAML: mapping values are not allowed here (line 2"),
        ("", "is empty"),
        ("# only a comment\n", "is empty"),
        ("- 1\n- 2\n", "the top level must be a mapping, got list"),
    ],
)
@pytest.mark.parametrize("command", ["fit", "pretrain"])
def test_cli_broken_config_files_are_one_line(tmp_path: Path, capsys, command, text, message):
    config = tmp_path / "cfg.yaml"
    config.write_text(text)
    assert main([command, "--config", str(config), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(config) in err and message in err
    assert not (tmp_path / "r").exists()


def test_cli_unparsable_set_value_names_the_override(tmp_path: Path, capsys) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(digits_config()))
    args = ["fit", "--config", str(config), "--out", str(tmp_path / "r")]
    assert main([*args, "--set", "data.batch_size=[1,"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--set data.batch_size=[1,: the value is not valid YAML" in err


# "64-true" and "16-true" used to pass validation and crash in the first validation step
@pytest.mark.parametrize("precision", ["15", "64-true", "16-true", "bf16-true"])
def test_cli_flags_are_validated_before_anything_is_written(
    tmp_path: Path, capsys, precision: str
) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(digits_config()))
    args = ["fit", "--config", str(config), "--out", str(tmp_path / "r"), "--precision", precision]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "trainer.precision must be one of" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("seeds", "message"),
    [("0,a", "comma-separated integers"), ("0,0", "distinct"), ("-1", "non-negative")],
)
@pytest.mark.parametrize("command", ["compare", "demo"])
def test_cli_bad_seeds_name_the_flag(tmp_path: Path, capsys, command, seeds, message) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(digits_config()))
    args = [command, f"--seeds={seeds}", "--out", str(tmp_path / "r")]
    args[1:1] = [str(config)] if command == "compare" else []
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "argument --seeds" in err and message in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("command", ["fit", "eval", "compare", "demo", "data"])
def test_every_command_has_help(command: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "anchorlearn", command, "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    assert "usage: anchorlearn" in result.stdout


def test_version_names_the_package_and_torch_without_importing_torch() -> None:
    code = (
        "import sys; from anchorlearn.cli import main\n"
        "try:\n    main(['--version'])\n"
        "except SystemExit as exit:\n    assert exit.code == 0, exit.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    from importlib.metadata import version

    from anchorlearn import __version__

    assert result.stdout.strip() == f"anchorlearn {__version__} (torch {version('torch')})"


def test_cli_eval_split_choices_are_the_evaluable_splits() -> None:
    # the CLI spells the choices itself so that `--help` does not import torch
    from anchorlearn.cli import build_parser
    from anchorlearn.engine.evaluate import SPLITS

    parser = build_parser()
    args = parser.parse_args(["eval", "--checkpoint", "x.ckpt", "--split", "val"])
    assert args.split == "val"
    eval_parser = parser._subparsers._group_actions[0].choices["eval"]
    (split_action,) = [a for a in eval_parser._actions if a.dest == "split"]
    assert tuple(split_action.choices) == SPLITS


@pytest.mark.parametrize("command", ["fit", "pretrain"])
def test_cli_config_is_positional_or_a_flag_never_two(tmp_path: Path, capsys, command) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text("- 1\n")  # loaded (and refused) before any training
    for given in ([str(config)], ["--config", str(config)], [str(config), "--config", str(config)]):
        assert main([command, *given, "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert str(config) in err and "the top level must be a mapping" in err
    other = tmp_path / "other.yaml"
    with pytest.raises(SystemExit) as raised:
        main([command, str(config), "--config", str(other)])
    assert raised.value.code == 2
    assert f"two configs given, {config} and {other}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as raised:
        main([command, "--out", str(tmp_path / "r")])
    assert raised.value.code == 2
    assert f"{command}: no config given; anchorlearn {command} CONFIG" in capsys.readouterr().err


def test_cli_eval_without_a_checkpoint_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["eval", "--split", "val"])
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert "eval: no checkpoint given; anchorlearn eval CHECKPOINT (or --checkpoint" in err


@pytest.mark.parametrize(
    ("command", "config", "message"),
    [
        ("fit", "configs/ssl/pcl.yaml", "(method: pcl); run it with anchorlearn pretrain"),
        ("pretrain", "configs/fmnist_lt/ce.yaml", "(task: classification); run it with"),
    ],
)
def test_cli_a_config_given_to_the_other_command_names_the_right_one(
    tmp_path: Path, capsys, command: str, config: str, message: str
) -> None:
    root = Path(__file__).parents[2]
    assert main([command, str(root / config), "--out", str(tmp_path / "r")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
