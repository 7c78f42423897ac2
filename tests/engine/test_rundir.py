"""Run directories: the exclusive lock, writable outputs, strict JSON, fingerprint checks."""

from __future__ import annotations

import ast
import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from anchorlearn.engine import rundir
from anchorlearn.engine.rundir import (
    LOCK_FILE,
    RunError,
    check_data_fingerprint,
    check_output_dir,
    check_output_file,
    fingerprint_differences,
    lock_run_dir,
    write_json,
)

AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _refuse(constant: str) -> None:
    raise ValueError(f"not strict JSON: {constant}")


def _lock_record(pid: int, host: str | None = None) -> str:
    host = socket.gethostname() if host is None else host
    record = {"pid": pid, "host": host, "started": "2026-01-02T03:04:05+00:00", "command": "x"}
    return json.dumps(record)


def test_the_rundir_module_and_the_cli_parser_stay_torch_free() -> None:
    source = Path(rundir.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"torch", "lightning", "numpy"}
    code = (
        "import sys, anchorlearn, anchorlearn.cli as c; c.build_parser(); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- strict JSON ---------------------------------------------------------------------------


def test_write_json_writes_undefined_numbers_as_null(tmp_path: Path) -> None:
    payload = {
        "few": float("nan"),
        "top1": 0.5,
        "big": float("inf"),
        "per_class": {"a": -math.inf, "b": 1.0, "c": None},
        "rows": [1, float("nan"), np.float32("nan"), np.float64(0.25), np.int64(3)],
        "flag": True,
    }
    path = write_json(tmp_path / "sub" / "m.json", payload)
    text = path.read_text()
    stored = json.loads(text, parse_constant=_refuse)
    assert stored == {
        "few": None,
        "top1": 0.5,
        "big": None,
        "per_class": {"a": None, "b": 1.0, "c": None},
        "rows": [1, None, None, 0.25, 3],
        "flag": True,
    }
    assert payload["few"] != payload["few"]  # the caller's values are left as they were
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.json"]  # no temporary left


# -- the lock --------------------------------------------------------------------------------


def test_a_second_process_is_refused_naming_the_holder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys, time
                from anchorlearn.engine.rundir import lock_run_dir
                with lock_run_dir({str(run)!r}, command="holder"):
                    print("locked", flush=True)
                    sys.stdin.readline()
                """
            ),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        record = json.loads((run / LOCK_FILE).read_text())
        assert record["pid"] == holder.pid and record["command"] == "holder"
        assert record["host"] == socket.gethostname() and record["started"]
        with pytest.raises(RunError) as err, lock_run_dir(run):
            pass
        message = str(err.value)
        assert message == (
            f"{run} is in use by pid {holder.pid} on host {socket.gethostname()} since "
            f"{record['started']} (lock file {run / LOCK_FILE}); wait for it or choose "
            "another --out"
        )
    finally:
        holder.communicate("\n", timeout=60)
    assert holder.returncode == 0
    assert not (run / LOCK_FILE).exists()  # released when the holder finished
    with lock_run_dir(run):
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not run.exists()  # created for the lock, left empty: removed again


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path: Path, dead_pid, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text(_lock_record(dead_pid))
    with lock_run_dir(run):
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"warning: taking over the lock of {run}: pid {dead_pid}")
    assert "no longer running" in err[0]
    assert sorted(p.name for p in run.iterdir()) == []  # the stale copy is gone too
    assert run.is_dir()  # it existed before: kept


def test_a_lock_left_with_this_process_pid_is_stale(tmp_path: Path, capsys) -> None:
    # a process of an earlier container had the pid this one has now
    (tmp_path / LOCK_FILE).write_text(_lock_record(os.getpid()))
    with lock_run_dir(tmp_path):
        assert (
            json.loads((tmp_path / LOCK_FILE).read_text())["started"] != "2026-01-02T03:04:05+00:00"
        )
    assert "taking over the lock" in capsys.readouterr().err


def test_a_lock_held_on_another_host_is_not_taken_over(tmp_path: Path, dead_pid) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text(_lock_record(dead_pid, host="elsewhere"))
    with pytest.raises(RunError) as err, lock_run_dir(run):
        pass
    message = str(err.value)
    assert f"in use by pid {dead_pid} on host elsewhere" in message
    assert f"if that run is dead, delete {run / LOCK_FILE}" in message
    assert json.loads((run / LOCK_FILE).read_text())["host"] == "elsewhere"


def test_an_unreadable_lock_file_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(rundir, "_UNREADABLE_WAIT_S", 0.1)  # re-read while it may be written
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text("{not json")
    with pytest.raises(RunError, match=r"cannot be read .* delete it if no run uses"):
        with lock_run_dir(run):
            pass


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt, SystemExit])
def test_the_lock_is_released_when_the_run_fails(tmp_path: Path, error) -> None:
    run = tmp_path / "a" / "run"
    with pytest.raises(error), lock_run_dir(run):
        assert (run / LOCK_FILE).is_file()
        raise error()
    assert not (tmp_path / "a").exists()  # every folder it created was empty: removed
    kept = tmp_path / "kept"
    with pytest.raises(error), lock_run_dir(kept):
        (kept / "config.yaml").write_text("x")
        raise error()
    assert sorted(p.name for p in kept.iterdir()) == ["config.yaml"]


def test_the_lock_is_reentrant_within_a_process(tmp_path: Path) -> None:
    with lock_run_dir(tmp_path), lock_run_dir(tmp_path):
        assert (tmp_path / LOCK_FILE).is_file()
    assert not (tmp_path / LOCK_FILE).exists()


@pytest.mark.parametrize("variable", ["LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID"])
def test_other_ranks_of_a_distributed_run_do_not_lock(
    tmp_path: Path, monkeypatch, live_pid, variable: str
) -> None:
    # Lightning's launcher re-runs the command with LOCAL_RANK=1.. while rank 0 holds the lock
    (tmp_path / LOCK_FILE).write_text(_lock_record(live_pid))
    monkeypatch.setenv(variable, "1")
    with lock_run_dir(tmp_path):
        pass
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == live_pid
    monkeypatch.setenv(variable, "0")
    with pytest.raises(RunError, match=f"in use by pid {live_pid}"), lock_run_dir(tmp_path):
        pass


# -- writable outputs -------------------------------------------------------------------------


def test_outputs_under_a_file_are_refused_naming_the_path(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RunError, match=f"--out {blocker / 'run'}: cannot create this folder"):
        check_output_dir(blocker / "run", "--out")
    with pytest.raises(RunError, match=f"--out {blocker / 'm.json'}: cannot create the folder"):
        check_output_file(blocker / "m.json", "--out")
    with pytest.raises(RunError, match=f"--out {tmp_path} is a folder: give a file name"):
        check_output_file(tmp_path, "--out")
    with pytest.raises(RunError, match=f"cannot create the run directory {blocker / 'r'}"):
        with lock_run_dir(blocker / "r"):
            pass
    assert check_output_file(tmp_path / "new" / "m.json", "--out") == tmp_path / "new" / "m.json"
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == []


@pytest.mark.skipif(AS_ROOT, reason="root writes into read-only folders")
def test_read_only_outputs_are_refused_naming_the_path(tmp_path: Path) -> None:
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(RunError, match=f"--out {locked}: cannot write there"):
            check_output_dir(locked, "--out")
        with pytest.raises(RunError, match=f"--out {locked / 'sub'}: cannot create"):
            check_output_dir(locked / "sub", "--out")
        with pytest.raises(RunError, match=f"cannot write to the run directory {locked}"):
            with lock_run_dir(locked):
                pass
    finally:
        locked.chmod(0o700)


def test_an_existing_device_pipe_or_link_is_written_without_its_folder(
    tmp_path: Path, monkeypatch
) -> None:
    # `eval --out /dev/stdout`: /dev is not writable, the file is; write_json writes such a
    # path in place, so only the file itself needs to be writable
    checked = []

    def folder_unwritable(path: Path):
        checked.append(path)
        return "write", PermissionError(13, "Permission denied")

    monkeypatch.setattr(rundir, "_unwritable", folder_unwritable)  # root writes anywhere
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    assert check_output_file(pipe, "--out") == pipe
    assert check_output_file(os.devnull, "--out") == Path(os.devnull)
    target = tmp_path / "elsewhere" / "m.json"
    target.parent.mkdir()
    target.write_text("{}")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    assert check_output_file(link, "--out") == link
    assert checked == []
    # a regular file is replaced through a temporary file beside it: its folder must be
    # writable
    with pytest.raises(RunError, match=f"--out {target}: cannot write in {target.parent} "):
        check_output_file(target, "--out")
    monkeypatch.setattr(rundir.os, "access", lambda path, mode: False)  # as for a non-root user
    with pytest.raises(RunError, match=f"--out {pipe}: the file is read-only"):
        check_output_file(pipe, "--out")


@pytest.mark.skipif(AS_ROOT, reason="root writes into /dev")
def test_dev_null_is_accepted_as_it_is() -> None:
    assert check_output_file(os.devnull, "--out") == Path(os.devnull)


def test_write_json_writes_through_a_link(tmp_path: Path) -> None:
    target = tmp_path / "runs" / "m.json"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "latest.json"
    link.symlink_to(target)
    assert write_json(link, {"top1": float("nan")}) == link
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert json.loads(target.read_text()) == {"top1": None}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "runs"]
    assert write_json(os.devnull, {"a": 1}) == Path(os.devnull)


# -- data fingerprints ----------------------------------------------------------------------


def _fingerprint(**content) -> dict:
    splits = {
        name: {"samples": 10, "content_sha256": content.get(name, name * 8)}
        for name in ("train", "val", "test")
    }
    return {
        "version": 1,
        "kind": "arrays",
        "source": "npz:d.npz",
        "splits": splits,
        "split_indices_sha256": content.get("indices", "i" * 64),
    }


def test_fingerprint_differences_say_what_changed() -> None:
    stored = _fingerprint()
    assert fingerprint_differences(stored, _fingerprint()) == []
    moved = _fingerprint(test="1a2b3c4d5e6f", train="abcdef012345")
    assert fingerprint_differences(stored, moved) == [
        "the test and train splits of npz:d.npz now hold different images or labels than when "
        "the run trained (test content hash 1a2b3c4d... now, testtest... then)"
    ]
    fewer = _fingerprint()
    fewer["splits"]["val"]["samples"] = 9
    assert fingerprint_differences(stored, fewer) == [
        "the val split of npz:d.npz now has 9 samples, 10 when the run trained"
    ]
    resplit = _fingerprint(indices="f" * 64)
    assert fingerprint_differences(stored, resplit) == [
        "the splits of npz:d.npz now draw other samples than when the run trained "
        "(split-index hash ffffffff... now, iiiiiiii... then)"
    ]
    # other samples in a split say more than other positions: the index hash is then left out
    assert len(fingerprint_differences(stored, _fingerprint(val="0" * 64, indices="f" * 64))) == 1
    files = {**_fingerprint(test="9" * 64), "kind": "files"}
    assert (
        "now holds different files (names or sizes)"
        in fingerprint_differences({**stored, "kind": "files"}, files)[0]
    )


def test_a_data_change_is_refused_unless_allowed(capsys) -> None:
    stored, moved = _fingerprint(), _fingerprint(test="1a2b3c4d5e6f")
    with pytest.raises(RunError) as err:
        check_data_fingerprint(stored, moved, checkpoint="r/last.ckpt", action="evaluate")
    assert str(err.value) == (
        "the test split of npz:d.npz now holds different images or labels than when the run "
        "trained (content hash 1a2b3c4d... now, testtest... then): the data changed; pass "
        "--allow-data-change (allow_data_change=True) to evaluate anyway"
    )
    check_data_fingerprint(stored, moved, checkpoint="r/last.ckpt", action="resume", allow=True)
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("warning: the test split of")
    assert err_lines[0].endswith("resuming anyway (--allow-data-change)")
    check_data_fingerprint(stored, stored, checkpoint="r/last.ckpt", action="evaluate")
    assert capsys.readouterr().err == ""
    check_data_fingerprint(None, moved, checkpoint="r/last.ckpt", action="evaluate")
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert err_lines == [
        "warning: r/last.ckpt holds no data fingerprint (written before they were stored): "
        "the data cannot be checked against the data the run trained on"
    ]


def test_fingerprint_differences_name_what_differs() -> None:
    stored = _fingerprint()
    # only the labels of the val split changed: the content hash covers images and labels
    relabelled = _fingerprint(val="5" * 64)
    assert fingerprint_differences(stored, relabelled) == [
        "the val split of npz:d.npz now holds different images or labels than when the run "
        "trained (content hash 55555555... now, valvalva... then)"
    ]
    for fingerprint in (stored, relabelled):
        fingerprint["splits"]["val"]["image_shape"] = [1, 8, 8]
    resized = _fingerprint(val="6" * 64)
    resized["splits"]["val"]["image_shape"] = [3, 8, 8]
    assert fingerprint_differences(stored, resized) == [
        "the val split of npz:d.npz now has images of shape [3, 8, 8], [1, 8, 8] when the run "
        "trained"
    ]
    # a moved file with the same data is the same data; with other data, both are named
    assert fingerprint_differences(stored, {**stored, "source": "npz:e.npz"}) == []
    moved = {**_fingerprint(test="7" * 64), "source": "npz:e.npz"}
    moved["splits"]["val"]["image_shape"] = [1, 8, 8]
    assert fingerprint_differences(stored, moved) == [
        "the data are read from npz:e.npz now, from npz:d.npz when the run trained",
        "the test split of npz:e.npz now holds different images or labels than when the run "
        "trained (content hash 77777777... now, testtest... then)",
    ]
    # a folder data set whose val split is now another split of the data set
    files = {**_fingerprint(), "kind": "files", "source": "camvid:/d"}
    files["splits"]["val"]["split"] = "val"
    other = {**_fingerprint(val="8" * 64), "kind": "files", "source": "camvid:/d"}
    other["splits"]["val"]["split"] = "test"
    assert fingerprint_differences(files, other) == [
        "the val split of camvid:/d is now the data set's 'test' split, 'val' when the run trained"
    ]
