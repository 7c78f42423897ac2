"""Run directories: an exclusive lock, outputs checked before the work, strict JSON, and the
check of a run's data fingerprint.

Nothing here imports torch (the command line may call it before a run loads anything).

- :func:`lock_run_dir` makes a run directory one process's: ``fit``, ``pretrain`` and
  ``compare`` hold it while they write, and a second process is refused at once with the
  holder's pid, host and start time.
- :func:`check_output_dir` / :func:`check_output_file` create an output's folder and a
  temporary file in it, so that an unwritable path fails before hours of work, not after.
- :func:`write_json` writes every JSON file of a run (``metrics.json``, ``eval --out``, ...):
  an undefined number (NaN, e.g. the accuracy of a class group with no test image, or
  infinity) is written as ``null``, which every strict JSON parser reads.
- :func:`check_data_fingerprint` compares the fingerprint of the data a run trained on (see
  the data modules' ``data_fingerprint``) with that of the data it would read now.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import shlex
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "DATA_FINGERPRINT_FILE",
    "DATA_FINGERPRINT_KEY",
    "LOCK_FILE",
    "RunError",
    "check_data_fingerprint",
    "check_output_dir",
    "check_output_file",
    "fingerprint_differences",
    "is_secondary_rank",
    "json_safe",
    "lock_run_dir",
    "write_json",
]

LOCK_FILE = ".lock"
DATA_FINGERPRINT_FILE = "data_fingerprint.json"
DATA_FINGERPRINT_KEY = "anchorlearn_data_fingerprint"

# Variables through which launchers tell a process its rank: Lightning's own launcher
# (LOCAL_RANK and NODE_RANK in the processes it starts), torchrun (RANK) and SLURM.
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
# How long a lock file that cannot be parsed is re-read (its holder may be writing it).
_UNREADABLE_WAIT_S = 1.0


class RunError(RuntimeError):
    """A problem with a run that the user can fix; the one-line message says what to do."""


def _reason(err: OSError) -> str:
    return err.strerror or str(err)


# -- strict JSON -----------------------------------------------------------------------------


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, +-inf), numpy's included, replaced by
    ``None`` and numpy scalars turned into Python numbers; dicts, lists and tuples are
    copied, everything else is returned as it is."""
    if isinstance(value, float):  # numpy's float64 too
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
        return json_safe(value.item())  # a numpy (or 0-d tensor) scalar
    return value


def write_json(path: str | os.PathLike[str], payload: Any) -> Path:
    """Write ``payload`` as indented strict JSON and return the path.

    NaN and infinity, which JSON does not have (Python would write the non-standard
    ``NaN``), are written as ``null``: a metric that is undefined, such as the ``few``
    accuracy when no test image belongs to a few-shot class, reads back as ``None``. The
    file is written beside its destination and then renamed onto it, so that a reader
    never sees half a file (a destination that is not a regular file, e.g.
    ``/dev/stdout``, is written directly); missing folders are created.
    """
    path = Path(path)
    text = json.dumps(json_safe(payload), indent=2, allow_nan=False) + "\n"
    if path.exists() and not path.is_file():
        path.write_text(text)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


# -- writable outputs ------------------------------------------------------------------------


def _missing_parents(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while not path.exists() and not path.is_symlink() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _unwritable(path: Path) -> tuple[str, OSError] | None:
    """Create the folder ``path`` and a temporary file in it; what failed, if anything."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return "create", err
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        return "write", err
    return None


def check_output_dir(path: str | os.PathLike[str], what: str) -> Path:
    """Create the folder ``path`` (with its parents) and a temporary file in it: a folder
    that cannot be written fails now, before any work, with a one-line :class:`RunError`
    naming ``what`` (the option, e.g. ``"--save-masks"``) and the path."""
    path = Path(path)
    failure = _unwritable(path)
    if failure is not None:
        step, err = failure
        where = "create this folder" if step == "create" else "write there"
        raise RunError(f"{what} {path}: cannot {where} ({_reason(err)})") from err
    return path


def check_output_file(path: str | os.PathLike[str], what: str) -> Path:
    """Make sure the file ``path`` can be written later: its folder is created and written
    to now (as :func:`check_output_dir`); a folder or a read-only file at ``path`` is
    refused with a one-line :class:`RunError`."""
    path = Path(path)
    if path.is_dir():
        raise RunError(f"{what} {path} is a folder: give a file name, e.g. {path / 'out.json'}")
    failure = _unwritable(path.parent)
    if failure is not None:
        step, err = failure
        where = "create the folder" if step == "create" else "write in"
        raise RunError(f"{what} {path}: cannot {where} {path.parent} ({_reason(err)})") from err
    if path.exists() and not os.access(path, os.W_OK):
        raise RunError(f"{what} {path}: the file is read-only")
    return path


# -- the lock --------------------------------------------------------------------------------


def is_secondary_rank() -> bool:
    """Whether this process is one of the extra processes of a distributed run: its launcher
    (Lightning's, torchrun or SLURM) set a non-zero rank in the environment. Such processes
    re-run the command of the process of rank 0, which holds the run directory."""
    for name in _RANK_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) != 0:
            return True
    return False


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one of another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, as another user's
        return True
    return True


def _read_record(lock: Path) -> dict | None:
    """The lock file's record; ``None`` when the file is gone. A file that does not parse is
    re-read for a moment (its holder may be writing it), then a :class:`RunError`."""
    deadline = time.monotonic() + _UNREADABLE_WAIT_S
    while True:
        try:
            text = lock.read_text()
        except FileNotFoundError:
            return None
        except OSError as err:
            problem = _reason(err)
        else:
            try:
                record = json.loads(text)
                if isinstance(record, dict) and isinstance(record.get("pid"), int):
                    return record
                problem = "not a lock record"
            except ValueError:
                problem = "not JSON"
        if time.monotonic() > deadline:
            raise RunError(
                f"{lock.parent} holds a lock file {lock} that cannot be read ({problem}): "
                f"delete it if no run uses {lock.parent}"
            )
        time.sleep(0.05)


def _in_use(lock: Path, record: dict) -> str:
    return (
        f"{lock.parent} is in use by pid {record.get('pid')} on host {record.get('host')} "
        f"since {record.get('started')} (lock file {lock})"
    )


def _take_over(lock: Path, record: dict) -> None:
    """Remove the stale lock ``record`` of a dead process of this host; a lock file that has
    changed meanwhile (another process took it over first) is put back."""
    stale = lock.with_name(f"{LOCK_FILE}.stale-{os.getpid()}")
    try:
        os.replace(lock, stale)
    except FileNotFoundError:
        return
    try:
        moved = json.loads(stale.read_text())
    except (OSError, ValueError):
        moved = None
    if moved != record:  # a live lock, written after we read the stale one: restore it
        with contextlib.suppress(OSError):
            os.link(stale, lock)
        stale.unlink(missing_ok=True)
        return
    stale.unlink(missing_ok=True)
    print(
        f"warning: taking over the lock of {lock.parent}: pid {record.get('pid')} on this "
        f"host, which took it at {record.get('started')}, is no longer running",
        file=sys.stderr,
    )


def _acquire(lock: Path, record: dict) -> None:
    host = record["host"]
    for _ in range(5):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_record(lock)
            if holder is None:
                continue  # released meanwhile
            if holder.get("host") != host:
                raise RunError(
                    f"{_in_use(lock, holder)}: it may be a run on another machine; wait for "
                    f"it, choose another --out, or, if that run is dead, delete {lock}"
                ) from None
            # this process's own pid in a lock it does not hold: left by an earlier process
            # that had the same pid (a container restarted, say)
            if holder["pid"] != os.getpid() and _pid_alive(int(holder["pid"])):
                raise RunError(
                    f"{_in_use(lock, holder)}; wait for it or choose another --out"
                ) from None
            _take_over(lock, holder)
            continue
        except OSError as err:
            raise RunError(
                f"cannot write to the run directory {lock.parent} ({_reason(err)}): choose "
                "another --out"
            ) from err
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(record, handle)
        except OSError as err:  # a full disk, say: leave no empty lock behind
            lock.unlink(missing_ok=True)
            raise RunError(
                f"cannot write to the run directory {lock.parent} ({_reason(err)}): choose "
                "another --out"
            ) from err
        return
    raise RunError(f"{lock.parent}: could not take its lock {lock}; try again")


def _release(lock: Path, record: dict) -> None:
    """Delete the lock file if it still holds ``record`` (a user may have deleted it)."""
    try:
        current = json.loads(lock.read_text())
    except (OSError, ValueError):
        return
    if current == record:
        lock.unlink(missing_ok=True)


# lock files this process holds -> [nesting depth, record]
_HELD: dict[Path, list] = {}


@contextlib.contextmanager
def lock_run_dir(run_dir: str | os.PathLike[str], *, command: str | None = None) -> Iterator[Path]:
    """Hold ``run_dir`` exclusively for this process while the ``with`` block runs.

    Creates ``run_dir`` (with its parents) and, atomically (``O_CREAT | O_EXCL``), the lock
    file ``run_dir/.lock`` holding ``{"pid", "host", "started", "command"}`` (``command``
    defaults to this process's command line). The lock is removed when the block ends,
    normally or by an exception (``KeyboardInterrupt`` and ``SystemExit`` included), and
    the folders created for it are removed again when they are still empty.

    Raises :class:`RunError`, without waiting, when another live process holds the
    directory (naming its pid, host and start time) or when the directory cannot be
    created or written. A lock left by a process of this host that no longer runs (killed)
    is taken over with a warning on stderr; one from another host is never taken over
    (whether its process lives cannot be told from here): the message says to delete it if
    that run is dead. The lock is re-entrant within a process, and not taken at all by the
    extra processes of a distributed run (:func:`is_secondary_rank`), which re-run the
    command of the process that holds it. A process killed with ``SIGKILL`` leaves its
    lock behind, which the next run on the same host takes over (unless its pid has been
    reused by another process meanwhile: then the message names that pid, and the lock
    file is to be deleted by hand).
    """
    run_dir = Path(run_dir)
    if is_secondary_rank():
        yield run_dir
        return
    created = _missing_parents(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunError(
            f"cannot create the run directory {run_dir} ({_reason(err)}): choose another --out"
        ) from err
    try:
        key = (run_dir / LOCK_FILE).resolve()
        if key in _HELD:
            _HELD[key][0] += 1
        else:
            record = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "command": shlex.join(sys.argv) if command is None else command,
            }
            _acquire(run_dir / LOCK_FILE, record)
            _HELD[key] = [1, record]
        try:
            yield run_dir
        finally:
            _HELD[key][0] -= 1
            if _HELD[key][0] == 0:
                _release(run_dir / LOCK_FILE, _HELD.pop(key)[1])
    finally:
        for folder in created:  # deepest first; a folder with anything in it stays
            try:
                folder.rmdir()
            except OSError:
                break


# -- data fingerprints -----------------------------------------------------------------------

_SPLIT_ORDER = ("test", "val", "train")
_WHAT_CHANGED = {"arrays": "images", "files": "files (names or sizes)"}


def _short(digest: Any) -> str:
    return f"{str(digest)[:8]}..."


def fingerprint_differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What differs between the fingerprint ``stored`` with a run and ``current`` (the data
    as they are now), one phrase per difference: a split's number of samples, the splits
    whose content hash differs, or, when every split holds the same samples, the
    split-index hash. Empty when the data are those the run read."""
    source = current.get("source")
    noun = _WHAT_CHANGED.get(str(current.get("kind")), "data")
    if stored.get("version") != current.get("version") or stored.get("kind") != current.get("kind"):
        return [
            f"the data of {source} were fingerprinted differently when the run trained "
            f"({stored.get('kind')} v{stored.get('version')}, now {current.get('kind')} "
            f"v{current.get('version')}) and cannot be compared"
        ]
    old_splits, new_splits = stored.get("splits", {}), current.get("splits", {})
    names = [s for s in _SPLIT_ORDER if s in old_splits or s in new_splits]
    names += sorted((old_splits.keys() | new_splits.keys()) - set(names))
    differences, changed = [], []
    for name in names:
        old, new = old_splits.get(name), new_splits.get(name)
        if old is None or new is None:
            had = "had no" if old is None else "had a"
            differences.append(f"the run {had} {name} split of {source}")
        elif old.get("samples") != new.get("samples"):
            differences.append(
                f"the {name} split of {source} now has {new.get('samples')} samples, "
                f"{old.get('samples')} when the run trained"
            )
        elif old.get("content_sha256") != new.get("content_sha256"):
            changed.append(name)
    if changed:
        first = old_splits[changed[0]], new_splits[changed[0]]
        hashes = (
            f"content hash {_short(first[1].get('content_sha256'))} now, "
            f"{_short(first[0].get('content_sha256'))} then"
        )
        if len(changed) == 1:
            differences.append(
                f"the {changed[0]} split of {source} now holds different {noun} than when "
                f"the run trained ({hashes})"
            )
        else:
            splits = ", ".join(changed[:-1]) + f" and {changed[-1]}"
            differences.append(
                f"the {splits} splits of {source} now hold different {noun} than when the run "
                f"trained ({changed[0]} {hashes})"
            )
    old_index, new_index = stored.get("split_indices_sha256"), current.get("split_indices_sha256")
    if not differences and old_index != new_index:  # the same samples, drawn another way
        differences.append(
            f"the splits of {source} now draw other samples than when the run trained "
            f"(split-index hash {_short(new_index)} now, {_short(old_index)} then)"
        )
    return differences


def check_data_fingerprint(
    stored: Mapping[str, Any] | None,
    current: Mapping[str, Any],
    *,
    checkpoint: str | os.PathLike[str],
    action: str,
    allow: bool = False,
) -> None:
    """Refuse to ``action`` (``"evaluate"``, ``"resume"``, ``"probe"``) a run whose data
    changed: a one-line :class:`RunError` saying what differs (see
    :func:`fingerprint_differences`). With ``allow`` (``--allow-data-change``) the same is a
    warning on stderr. A checkpoint written before fingerprints were stored
    (``stored is None``) is accepted with a warning."""
    if stored is None:
        print(
            f"warning: {checkpoint} holds no data fingerprint (written before they were "
            "stored): the data cannot be checked against the data the run trained on",
            file=sys.stderr,
        )
        return
    differences = fingerprint_differences(stored, current)
    if not differences:
        return
    what = "; ".join(differences)
    if allow:
        doing = (action[:-1] if action.endswith("e") else action) + "ing"
        print(f"warning: {what}: {doing} anyway (--allow-data-change)", file=sys.stderr)
        return
    raise RunError(
        f"{what}: the data changed; pass --allow-data-change (allow_data_change=True) to "
        f"{action} anyway"
    )
