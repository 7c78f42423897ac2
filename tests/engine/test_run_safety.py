"""What `fit`, `pretrain`, `eval`, `compare` and `data preview` do with locked or unwritable
run directories, fp16 on a CPU, undefined metrics in JSON, bad checkpoints and `--resume`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from tests.engine.runfixtures import npz_config, write_npz

from anchorlearn.cli import main
from anchorlearn.engine.config import parse_config
from anchorlearn.engine.runner import RunError, fit, load_run

AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _refuse(constant: str) -> None:
    raise ValueError(f"not strict JSON: {constant}")


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A finished one-epoch run on the ``.npz`` of :mod:`runfixtures`: (config file, run)."""
    root = tmp_path_factory.mktemp("trained")
    config = root / "cfg.yaml"
    config.write_text(yaml.safe_dump(npz_config(write_npz(root / "d.npz"))))
    run = root / "run"
    assert main(["fit", "--config", str(config), "--out", str(run), "--no-plots"]) == 0
    return config, run


def _ssl_config(tmp_path: Path) -> Path:
    raw = {
        "name": "tiny",
        "method": "moco",
        "data": {"source": "digits", "batch_size": 64, "max_train_samples": 128},
        "model": {"kwargs": {"width": 8, "feat_dim": 16}, "queue_size": 128},
        "cluster": {"num_clusters": [6]},
        "trainer": {"max_epochs": 1, "progress": False},
        "eval": {"tsne": False, "probe_steps": 10},
    }
    path = tmp_path / "ssl.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# -- two processes, one run directory --------------------------------------------------------


def test_fit_into_a_run_directory_in_use_is_refused_before_training(
    trained, tmp_path: Path, capsys
) -> None:
    config, _ = trained
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(["sleep", "30"])  # a live process of this host holds the lock
    host = socket.gethostname()
    record = {"pid": holder.pid, "host": host, "started": "2026-01-02T03:04:05+00:00"}
    (run / ".lock").write_text(json.dumps({**record, "command": "anchorlearn fit"}))
    args = ["fit", "--config", str(config), "--out", str(run), "--no-plots"]
    try:
        capsys.readouterr()
        assert main([*args, "--set", "optim.lr=0.2"]) == 2
        err = _one_line(capsys.readouterr().err)
        assert err == (
            f"anchorlearn: error: {run} is in use by pid {holder.pid} on host {host} since "
            f"2026-01-02T03:04:05+00:00 (lock file {run / '.lock'}); wait for it or choose "
            "another --out"
        )
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing was written
    finally:
        holder.kill()
        holder.wait()
    # the holder died without removing its lock: the next run takes it over and trains
    assert main(args) == 0
    assert "taking over the lock" in capsys.readouterr().err
    assert (run / "metrics.json").is_file() and not (run / ".lock").exists()


def test_a_failed_run_releases_its_lock_and_leaves_no_folder(tmp_path: Path) -> None:
    raw = npz_config(write_npz(tmp_path / "d.npz"))
    raw["model"]["kwargs"]["num_classes"] = 5  # the data have 3: refused after the lock
    with pytest.raises(RunError, match="num_classes=5"):
        fit(parse_config(raw), tmp_path / "run", quiet=True, plots=False)
    assert not (tmp_path / "run").exists()


class _Interrupt(L.Callback):
    """Ctrl+C during the first epoch."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        raise KeyboardInterrupt


def test_an_interrupted_run_releases_its_lock(tmp_path: Path) -> None:
    cfg = parse_config(npz_config(write_npz(tmp_path / "d.npz")))
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning's graceful shutdown ends with exit(1)
            fit(cfg, tmp_path / "run", quiet=True, plots=False, callbacks=[_Interrupt()])
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores Ctrl+C from then on
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert not (tmp_path / "run" / ".lock").exists()
    assert fit(cfg, tmp_path / "run", resume=True, quiet=True, plots=False)["epochs"] == 1


def test_compare_locks_its_output_folder(trained, tmp_path: Path, capsys) -> None:
    config, _ = trained
    out = tmp_path / "grid"
    out.mkdir()
    holder = subprocess.Popen(["sleep", "30"])
    record = {"pid": holder.pid, "host": socket.gethostname(), "started": "t", "command": "c"}
    (out / ".lock").write_text(json.dumps(record))
    try:
        assert main(["compare", str(config), "--seeds", "0", "--out", str(out)]) == 2
    finally:
        holder.kill()
        holder.wait()
    assert f"{out} is in use by pid {holder.pid}" in _one_line(capsys.readouterr().err)
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


# -- fp16 on a CPU ---------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["16-mixed", "16"])
@pytest.mark.parametrize("command", ["fit", "pretrain"])
def test_fp16_on_the_cpu_is_refused_with_the_alternative(
    trained, tmp_path: Path, capsys, command: str, precision: str
) -> None:
    config = trained[0] if command == "fit" else _ssl_config(tmp_path)
    out = tmp_path / "run"
    args = [command, "--config", str(config), "--out", str(out), "--accelerator", "cpu"]
    assert main([*args, "--precision", precision]) == 2
    assert _one_line(capsys.readouterr().err) == (
        f"anchorlearn: error: precision {precision} needs a CUDA GPU; on the CPU use "
        "bf16-mixed (or 32-true)"
    )
    assert not out.exists()


# -- unwritable outputs ----------------------------------------------------------------------


def _blocked(tmp_path: Path) -> Path:
    """A regular file: nothing can be created under it, not even by root."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    return blocker


def test_unwritable_run_directories_are_refused_before_any_work(
    trained, tmp_path: Path, capsys
) -> None:
    config, _ = trained
    blocker = _blocked(tmp_path)
    cases = [
        (["fit", "--config", str(config)], blocker / "run", "run directory"),
        (["pretrain", "--config", str(_ssl_config(tmp_path))], blocker / "run", "run directory"),
        (["compare", str(config), "--seeds", "0"], blocker / "grid", "run directory"),
    ]
    for args, out, what in cases:
        assert main([*args, "--out", str(out)]) == 2
        captured = capsys.readouterr()
        err = _one_line(captured.err)
        assert err.startswith(f"anchorlearn: error: cannot create the {what} {out} (")
        assert "training ->" not in captured.out


def test_unwritable_eval_and_preview_outputs_are_refused_before_any_work(
    trained, tmp_path: Path, capsys
) -> None:
    _, run = trained
    ckpt = str(run / "checkpoints" / "last.ckpt")
    blocker = _blocked(tmp_path)
    cases = [
        (["eval", "--checkpoint", ckpt, "--out", str(blocker / "m.json")], "--out"),
        (["eval", "--checkpoint", ckpt, "--save-masks", str(blocker / "m")], "--save-masks"),
        (["data", "preview", "digits", "--out", str(blocker / "p.png")], "--out"),
    ]
    for args, flag in cases:
        assert main(args) == 2
        captured = capsys.readouterr()
        assert captured.out == ""  # no metrics, no counts: refused before the work
        err = _one_line(captured.err)
        assert err.startswith(f"anchorlearn: error: {flag} {blocker}/") and "cannot create" in err


@pytest.mark.skipif(AS_ROOT, reason="root writes into read-only folders")
def test_read_only_folders_are_refused_before_any_work(trained, tmp_path: Path, capsys) -> None:
    config, run = trained
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(["fit", "--config", str(config), "--out", str(locked)]) == 2
        assert "cannot write to the run directory" in _one_line(capsys.readouterr().err)
        ckpt = str(run / "checkpoints" / "last.ckpt")
        assert main(["eval", "--checkpoint", ckpt, "--out", str(locked / "m.json")]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and f"cannot write in {locked}" in _one_line(captured.err)
    finally:
        locked.chmod(0o700)


def test_eval_prints_the_metrics_before_writing_them(trained, tmp_path: Path, capsys, monkeypatch):
    from anchorlearn.engine import rundir

    def failing_write(path, payload):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rundir, "write_json", failing_write)
    _, run = trained
    out = tmp_path / "m.json"
    ckpt = str(run / "checkpoints" / "last.ckpt")
    assert main(["eval", "--checkpoint", ckpt, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert "top1" in captured.out  # printed: the computed metrics are not lost
    assert _one_line(captured.err) == (
        f"anchorlearn: error: could not write the metrics to {out} (No space left on device); "
        "they are printed above"
    )


# -- NaN in JSON -----------------------------------------------------------------------------


def test_undefined_metrics_are_null_in_every_json_file(trained, tmp_path: Path, capsys) -> None:
    _, run = trained
    out = tmp_path / "eval.json"
    ckpt = str(run / "checkpoints" / "last.ckpt")
    assert main(["eval", "--checkpoint", ckpt, "--out", str(out)]) == 0
    # the one "few" class has no test image: its group accuracy is undefined
    evaluated = json.loads(out.read_text(), parse_constant=_refuse)
    assert evaluated["few"] is None and evaluated["per_class"]["2"] is None
    assert 0.0 <= evaluated["top1"] <= 1.0
    for name in ("metrics.json", "class_counts.json", "data_fingerprint.json"):
        json.loads((run / name).read_text(), parse_constant=_refuse)
    assert json.loads((run / "metrics.json").read_text())["few"] is None


# -- messages --------------------------------------------------------------------------------


def test_a_checkpoint_mismatch_lists_a_few_keys_and_counts_the_rest(trained, tmp_path) -> None:
    _, run = trained
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    state = ckpt["state_dict"]
    first = next(iter(state))
    state.pop(first)
    for i in range(150):
        state[f"model.extra.{i:03d}"] = torch.zeros(1)
    weight = next(k for k in state if k.endswith("weight") and state[k].ndim == 4)
    state[weight] = torch.zeros(1, 2, 3, 3)
    path = tmp_path / "bad.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(RunError) as err:
        load_run(path)
    message = str(err.value)
    assert "\n" not in message and len(message) < 700
    assert message.startswith(f"{path} does not match its own config: 1 missing key ({first})")
    assert (
        "150 unexpected keys (model.extra.000, model.extra.001, model.extra.002, "
        "model.extra.003, model.extra.004 and 145 more)" in message
    )
    assert f"1 key of another shape ({weight}: (1, 2, 3, 3) in the checkpoint" in message


def test_resume_without_a_checkpoint_says_it_starts_fresh(tmp_path: Path, capsys) -> None:
    cfg = parse_config(npz_config(write_npz(tmp_path / "d.npz")))
    run = tmp_path / "run"
    run.mkdir()
    capsys.readouterr()
    metrics = fit(cfg, run, resume=True, quiet=True, plots=False)
    assert metrics["epochs"] == 1
    notes = [line for line in capsys.readouterr().err.splitlines() if "--resume" in line]
    assert notes == [
        f"--resume: {run} holds no checkpoint (checkpoints/last.ckpt): starting a fresh run"
    ]
