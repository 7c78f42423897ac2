"""The run-directory lock across PID namespaces (containers), reboots and reused pids, and its
take-over when several processes find the same stale lock at once."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from anchorlearn.engine import rundir
from anchorlearn.engine.rundir import LOCK_FILE, RunError, lock_run_dir

HOST = socket.gethostname()
BOOT = "7d3c9e2a-boot"
NAMESPACE = "pid:[4026532001]"
STARTED = "2026-01-02T03:04:05+00:00"
HAS_PROC = Path("/proc/self/stat").is_file()


def _record(pid: int, **fields) -> dict:
    """A lock record of this host, this boot and this PID namespace unless ``fields`` say
    otherwise."""
    return {
        "pid": pid,
        "host": HOST,
        "boot_id": BOOT,
        "pid_namespace": NAMESPACE,
        "process_start": 1000,
        "started": STARTED,
        "command": "x",
        **fields,
    }


def _write(lock: Path, record: dict) -> None:
    """Put ``record`` at ``lock`` at once, as a process that wrote it elsewhere and renamed it."""
    partial = lock.with_name("partial")
    partial.write_text(json.dumps(record))
    os.replace(partial, lock)


def _create(lock: Path, record: dict) -> None:
    """Create ``lock`` as an acquiring process does (fails when it exists)."""
    fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(fd, "w") as handle:
        json.dump(record, handle)


def _held(lock: Path) -> dict:
    return json.loads(lock.read_text())


@pytest.fixture
def starts(monkeypatch) -> dict[int, int]:
    """This process's boot id and PID namespace fixed to BOOT and NAMESPACE, and the start
    times of processes read from the returned dict (pid -> clock ticks), so that the tests
    do not depend on /proc."""
    times: dict[int, int] = {os.getpid(): 500}
    monkeypatch.setattr(rundir, "_boot_id", lambda: BOOT)
    monkeypatch.setattr(rundir, "_pid_namespace", lambda: NAMESPACE)
    monkeypatch.setattr(rundir, "_start_time", lambda pid: times.get(pid))
    return times


# -- the identity of a holder ----------------------------------------------------------------


def test_a_lock_of_another_pid_namespace_is_refused_although_its_pid_is_gone(
    tmp_path: Path, starts, dead_pid
) -> None:
    # a container with the host's network (and host name) on a shared volume: its pid means
    # nothing here
    lock = tmp_path / LOCK_FILE
    other = "pid:[4026532999]"
    _write(lock, _record(dead_pid, pid_namespace=other))
    with pytest.raises(RunError) as err, lock_run_dir(tmp_path):
        pass
    assert str(err.value) == (
        f"{tmp_path} is in use by pid {dead_pid} on host {HOST} since {STARTED} (lock file "
        f"{lock}): it was taken in another PID namespace of this host ({other}, this process "
        f"is in {NAMESPACE}: another container), whose processes cannot be seen from here; "
        f"wait for it, choose another --out, or, if that run is dead, delete {lock}"
    )
    assert _held(lock)["pid_namespace"] == other


def test_a_lock_of_another_boot_is_refused(tmp_path: Path, starts, dead_pid) -> None:
    lock = tmp_path / LOCK_FILE
    _write(lock, _record(dead_pid, boot_id="another-boot"))
    with pytest.raises(RunError) as err, lock_run_dir(tmp_path):
        pass
    message = str(err.value)
    assert message.startswith(f"{tmp_path} is in use by pid {dead_pid} on host {HOST} since")
    assert "it was taken under another boot id (another-boot, now 7d3c9e2a-boot)" in message
    assert message.endswith(f"if that run is dead, delete {lock}")
    assert _held(lock)["boot_id"] == "another-boot"


def test_a_live_pid_that_started_after_the_holder_is_a_reused_pid(
    tmp_path: Path, starts, live_pid, capsys
) -> None:
    # the holder was killed; its pid now belongs to another process (the `sleep`)
    starts[live_pid] = 2000
    lock = tmp_path / LOCK_FILE
    _write(lock, _record(live_pid, process_start=1000))
    with lock_run_dir(tmp_path):
        assert _held(lock) == {
            **_record(os.getpid(), process_start=500, command=_held(lock)["command"]),
            "started": _held(lock)["started"],
        }
    assert capsys.readouterr().err.strip().splitlines() == [
        f"warning: taking over the lock of {tmp_path}: pid {live_pid} on this host, which "
        f"took it at {STARTED}, is no longer running (pid {live_pid} is another process now)"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_live_pid_with_its_recorded_start_time_holds_the_lock(
    tmp_path: Path, starts, live_pid
) -> None:
    starts[live_pid] = 1000
    lock = tmp_path / LOCK_FILE
    _write(lock, _record(live_pid, process_start=1000))
    with pytest.raises(RunError) as err, lock_run_dir(tmp_path):
        pass
    assert str(err.value) == (
        f"{tmp_path} is in use by pid {live_pid} on host {HOST} since {STARTED} (lock file "
        f"{lock}); wait for it or choose another --out"
    )
    # an unreadable start time (another user's process under hidepid) cannot prove a reuse
    del starts[live_pid]
    with pytest.raises(RunError, match=f"in use by pid {live_pid}"), lock_run_dir(tmp_path):
        pass


def test_a_lock_without_the_identity_fields_falls_back_to_the_pid(
    tmp_path: Path, starts, live_pid, dead_pid, capsys
) -> None:
    # written before boot id, namespace and start time were recorded
    lock = tmp_path / LOCK_FILE
    old = {"pid": live_pid, "host": HOST, "started": STARTED, "command": "x"}
    _write(lock, old)
    with pytest.raises(RunError, match=f"in use by pid {live_pid}"), lock_run_dir(tmp_path):
        pass
    _write(lock, {**old, "pid": dead_pid})
    with lock_run_dir(tmp_path):
        assert _held(lock)["pid"] == os.getpid()
    assert "taking over the lock" in capsys.readouterr().err


def test_without_proc_the_pid_decides(tmp_path: Path, monkeypatch, dead_pid, capsys) -> None:
    # macOS: no boot id, no namespace, no start times; a lock from Linux cannot be compared
    for name in ("_boot_id", "_pid_namespace"):
        monkeypatch.setattr(rundir, name, lambda: None)
    monkeypatch.setattr(rundir, "_start_time", lambda pid: None)
    lock = tmp_path / LOCK_FILE
    _write(lock, _record(dead_pid, pid_namespace="pid:[4026532999]"))
    with lock_run_dir(tmp_path):
        record = _held(lock)
        assert record["pid"] == os.getpid()
        assert record["boot_id"] is record["pid_namespace"] is record["process_start"] is None
    assert "taking over the lock" in capsys.readouterr().err


def test_the_start_time_is_read_after_the_last_parenthesis() -> None:
    # field 2, the command name in parentheses, may hold spaces and parentheses itself
    fields = [str(n) for n in range(3, 53)]  # fields 3 .. 52 after the command name
    fields[0] = "S"
    fields[22 - 3] = "987654"
    line = "4242 (a) (b c) " + " ".join(fields) + "\n"
    assert rundir._parse_start_time(line) == 987654
    assert rundir._parse_start_time("4242 (sleep) S 1 2\n") is None  # cut short
    assert rundir._parse_start_time("no parenthesis") is None
    assert rundir._parse_start_time("1 (x) " + " ".join(["S", *["-"] * 25])) is None


@pytest.mark.skipif(not HAS_PROC, reason="no /proc (macOS)")
def test_the_lock_records_the_identity_of_this_process(tmp_path: Path, live_pid) -> None:
    with lock_run_dir(tmp_path):
        record = _held(tmp_path / LOCK_FILE)
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert record["boot_id"] == boot and len(boot) == 36
    assert record["pid_namespace"] == os.readlink("/proc/self/ns/pid")
    own = Path("/proc/self/stat").read_text().split(") ")[-1].split()
    assert record["process_start"] == int(own[19]) == rundir._start_time(os.getpid())
    # the `sleep` started after this process did: later in clock ticks since boot
    assert rundir._start_time(live_pid) >= record["process_start"]
    assert rundir._start_time(-1) is None


# -- several processes taking over one stale lock ----------------------------------------------


def test_a_take_over_never_displaces_a_lock_taken_meanwhile(
    tmp_path: Path, starts, monkeypatch, dead_pid, live_pid
) -> None:
    # B reads the stale lock of `dead_pid`; before B removes it, A takes it over (A holds the
    # lock now); C tries to lock the directory the moment the path is free. Whatever B does,
    # A's lock must stay in place and B must be refused naming A.
    lock = tmp_path / LOCK_FILE
    starts[live_pid] = 1000
    holder_a = _record(live_pid, process_start=1000, command="A")
    holder_c = _record(os.getppid(), process_start=3000, command="C")
    starts[os.getppid()] = 3000
    _write(lock, _record(dead_pid))
    read = rundir._read_record
    calls = []

    def read_then_a_takes_over(path: Path):
        record = read(path)
        if not calls:  # B has just read the stale record
            calls.append(record)
            _write(lock, holder_a)
        return record

    monkeypatch.setattr(rundir, "_read_record", read_then_a_takes_over)
    for name in ("link", "rename", "replace", "unlink"):
        original = getattr(os, name)

        def c_acquires_on_a_free_path(*args, _original=original, **kwargs):
            result = _original(*args, **kwargs)
            if not lock.exists():
                _create(lock, holder_c)
            return result

        monkeypatch.setattr(os, name, c_acquires_on_a_free_path)
    with pytest.raises(RunError, match=f"in use by pid {live_pid} on host"), lock_run_dir(tmp_path):
        pass
    monkeypatch.undo()
    assert calls and calls[0]["pid"] == dead_pid
    assert _held(lock) == holder_a  # one holder: A
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]


def test_a_lock_created_once_the_stale_one_is_gone_wins(
    tmp_path: Path, starts, monkeypatch, dead_pid
) -> None:
    # C locks the directory between B's removal of the stale lock and B's own lock
    lock = tmp_path / LOCK_FILE
    holder_c = _record(os.getppid(), process_start=3000, command="C")
    starts[os.getppid()] = 3000
    _write(lock, _record(dead_pid))
    original = os.rename

    def rename_then_c_acquires(source, target, *args, **kwargs):
        original(source, target, *args, **kwargs)
        if Path(source) == lock:
            _create(lock, holder_c)

    monkeypatch.setattr(os, "rename", rename_then_c_acquires)
    with pytest.raises(RunError) as err, lock_run_dir(tmp_path):
        pass
    monkeypatch.undo()
    assert str(err.value).startswith(f"{tmp_path} is in use by pid {os.getppid()} on host")
    assert _held(lock) == holder_c
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]


def test_a_take_over_in_progress_is_waited_for(
    tmp_path: Path, starts, monkeypatch, dead_pid, live_pid
) -> None:
    # another process has claimed the stale lock and finishes its take-over while B waits
    lock = tmp_path / LOCK_FILE
    stale = _record(dead_pid)
    starts[live_pid] = 1000
    holder_a = _record(live_pid, process_start=1000, command="A")
    _write(lock, stale)
    claim = rundir._claim_path(lock, stale)
    claim.touch()
    original = rundir.time.sleep

    def a_finishes(seconds: float) -> None:
        if claim.exists():
            _write(lock, holder_a)
            claim.unlink()
        original(seconds)

    monkeypatch.setattr(rundir.time, "sleep", a_finishes)
    with pytest.raises(RunError, match=f"in use by pid {live_pid} on host"), lock_run_dir(tmp_path):
        pass
    monkeypatch.undo()
    assert _held(lock) == holder_a
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]


def test_an_interrupted_take_over_is_refused_naming_its_files(
    tmp_path: Path, starts, monkeypatch, dead_pid
) -> None:
    # a process died while taking over the stale lock: its claim stays, and nothing tells
    # whether it is still at work
    monkeypatch.setattr(rundir, "_CLAIM_WAIT_S", 0.1)
    lock = tmp_path / LOCK_FILE
    stale = _record(dead_pid)
    _write(lock, stale)
    claim = rundir._claim_path(lock, stale)
    claim.touch()
    assert claim.parent == tmp_path and claim.name.startswith(f"{LOCK_FILE}.takeover-")
    with pytest.raises(RunError) as err, lock_run_dir(tmp_path):
        pass
    assert str(err.value) == (
        f"{tmp_path}: another process began to take over the stale lock {lock} of pid "
        f"{dead_pid} and did not finish; if no run uses {tmp_path}, delete {claim} and {lock}"
    )
    assert _held(lock) == stale and claim.exists()
    claim.unlink()
    with lock_run_dir(tmp_path):  # once deleted, the stale lock is taken over
        assert _held(lock)["pid"] == os.getpid()
