"""Run directories: an exclusive lock, outputs checked before the work, strict JSON, and the
check of a run's data fingerprint.

Nothing here imports torch (the command line may call it before a run loads anything).

- :func:`lock_run_dir` makes a run directory one process's: ``fit``, ``pretrain`` and
  ``compare`` hold it while they write, and a second process is refused at once with the
  holder's pid, host and start time. The lock records the holder's boot id, PID namespace
  and process start time too, so that a lock of another container is never taken for a
  dead one and a reused pid is not taken for a live holder.
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
import hashlib
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
    "checkpoint_dir",
    "fingerprint_differences",
    "is_secondary_rank",
    "json_safe",
    "last_checkpoint",
    "lock_run_dir",
    "write_json",
]

LOCK_FILE = ".lock"
CHECKPOINT_DIR = "checkpoints"  # a run folder's checkpoints; the latest is last.ckpt there


def checkpoint_dir(run_dir: str | os.PathLike[str]) -> Path:
    """The folder a run in ``run_dir`` writes its checkpoints to."""
    return Path(run_dir) / CHECKPOINT_DIR


def last_checkpoint(run_dir: str | os.PathLike[str]) -> Path:
    """The checkpoint of the latest step of a run in ``run_dir`` (present or not)."""
    return checkpoint_dir(run_dir) / "last.ckpt"


DATA_FINGERPRINT_FILE = "data_fingerprint.json"
DATA_FINGERPRINT_KEY = "anchorlearn_data_fingerprint"

# Variables through which launchers tell a process its rank: Lightning's own launcher
# (LOCAL_RANK and NODE_RANK in the processes it starts), torchrun (RANK) and SLURM.
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
# How long a lock file that cannot be parsed is re-read (its holder may be writing it).
_UNREADABLE_WAIT_S = 1.0
# How long a take-over of a stale lock by another process is waited for (it takes
# milliseconds; one still claimed after this was interrupted).
_CLAIM_WAIT_S = 2.0
# Linux: this boot's id, and the /proc/<pid>/stat field (1-based) of a process's start time.
_BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"
_STAT_START_FIELD = 22


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
    never sees half a file. A destination that is not a regular file (``/dev/stdout``,
    a pipe) or is a symbolic link is written in place: through the link, which stays, and
    without its folder (``/dev``) having to be writable. Missing folders are created.
    """
    path = Path(path)
    text = json.dumps(json_safe(payload), indent=2, allow_nan=False) + "\n"
    if _written_in_place(path):
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


def _written_in_place(path: Path) -> bool:
    """Whether :func:`write_json` writes ``path`` directly rather than through a temporary
    file in its folder: an existing link, device or pipe."""
    return path.exists() and (path.is_symlink() or not path.is_file())


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
    """Make sure the file ``path`` can be written later by :func:`write_json`: its folder is
    created and written to now (as :func:`check_output_dir`), as the file will be replaced
    through a temporary file there; an existing link, device or pipe (``/dev/stdout``),
    which is written in place, only has to be writable itself. A folder or a read-only
    file at ``path`` is refused with a one-line :class:`RunError`."""
    path = Path(path)
    if path.is_dir():
        raise RunError(f"{what} {path} is a folder: give a file name, e.g. {path / 'out.json'}")
    if _written_in_place(path):
        if not os.access(path, os.W_OK):
            raise RunError(f"{what} {path}: the file is read-only")
        return path
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


def _boot_id() -> str | None:
    """This boot's id (Linux; it changes at every boot); ``None`` where it cannot be read."""
    try:
        return Path(_BOOT_ID_FILE).read_text().strip() or None
    except OSError:
        return None


def _pid_namespace() -> str | None:
    """The id of this process's PID namespace, e.g. ``"pid:[4026531836]"`` (Linux; a
    container has its own, in which pids mean other processes); ``None`` where it cannot be
    read."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _parse_start_time(stat: str) -> int | None:
    """The start time (clock ticks after boot, field 22) in the text of ``/proc/<pid>/stat``;
    ``None`` when the text does not hold it. The second field, the command name in
    parentheses, may itself hold spaces and parentheses: the fields are counted after the
    last ``")"``, where field 3 begins."""
    _, paren, rest = stat.rpartition(")")
    fields = rest.split()
    index = _STAT_START_FIELD - 3
    if not paren or len(fields) <= index or not fields[index].isdigit():
        return None
    return int(fields[index])


def _start_time(pid: int) -> int | None:
    """When the process ``pid`` of this PID namespace started (clock ticks after boot);
    ``None`` where it cannot be read (no such process, no ``/proc``)."""
    if pid <= 0:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes().decode(errors="replace")
    except OSError:
        return None
    return _parse_start_time(stat)


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


def _differ(theirs: Any, ours: Any) -> bool:
    """Whether an identity field of a lock record and this process's are known and differ."""
    return theirs is not None and ours is not None and theirs != ours


def _stale_because(lock: Path, holder: dict, ours: dict) -> str:
    """Why the lock ``holder`` is stale (its process is dead), for the warning; a
    :class:`RunError` naming the holder when it may live.

    A lock is stale only when it was taken on this host, under this boot and in this PID
    namespace (when both records hold these), and its pid is no process, this process, or
    a process that started at another time than the holder did (the pid was reused). A
    lock without the identity fields (an older one), or a process that cannot read its own
    (no ``/proc``), is judged by the pid alone."""
    if holder.get("host") != ours["host"]:
        raise RunError(
            f"{_in_use(lock, holder)}: it may be a run on another machine; wait for it, choose "
            f"another --out, or, if that run is dead, delete {lock}"
        )
    boot, namespace = holder.get("boot_id"), holder.get("pid_namespace")
    if _differ(boot, ours["boot_id"]):
        raise RunError(
            f"{_in_use(lock, holder)}: it was taken under another boot id ({boot}, now "
            f"{ours['boot_id']}): before this host restarted, or on another machine of the same "
            f"name; wait for it, choose another --out, or, if that run is dead, delete {lock}"
        )
    if _differ(namespace, ours["pid_namespace"]):
        raise RunError(
            f"{_in_use(lock, holder)}: it was taken in another PID namespace of this host "
            f"({namespace}, this process is in {ours['pid_namespace']}: another container), "
            "whose processes cannot be seen from here; wait for it, choose another --out, or, "
            f"if that run is dead, delete {lock}"
        )
    pid = int(holder["pid"])
    # this process's own pid in a lock it does not hold: left by an earlier process that had
    # the same pid (a container restarted, say)
    if pid == os.getpid() or not _pid_alive(pid):
        return "is no longer running"
    recorded = holder.get("process_start")
    if namespace is not None and namespace == ours["pid_namespace"] and isinstance(recorded, int):
        now = _start_time(pid)
        if now is not None and now != recorded:
            return f"is no longer running (pid {pid} is another process now)"
    raise RunError(f"{_in_use(lock, holder)}; wait for it or choose another --out")


def _claim_path(lock: Path, stale: dict) -> Path:
    """The file whose exclusive creation gives one process the right to remove the stale lock
    ``stale``: ``.lock.takeover-<digest of the record>`` beside ``lock``."""
    digest = hashlib.sha256(json.dumps(stale, sort_keys=True).encode()).hexdigest()
    return lock.with_name(f"{LOCK_FILE}.takeover-{digest[:16]}")


def _take_over(lock: Path, stale: dict, why: str) -> None:
    """Remove the stale lock ``stale`` unless it has changed meanwhile; the caller then
    creates its own lock exclusively, as in any acquire, so that a lock another process
    created first wins.

    Processes that find the same stale lock at once would each remove "the lock", and a
    late one would remove the live lock an early one had just created. So only the process
    that creates the claim file of this record (``O_CREAT | O_EXCL``) removes it, and only
    after reading that the lock file still holds it: a stale record is replaced by no one
    else. The file is moved aside (an atomic rename) and read once more before it is
    deleted; one that was deleted by hand and locked again meanwhile is put back. Another
    process's claim is waited for (up to ``_CLAIM_WAIT_S``); one that stays was interrupted,
    and the message says which files to delete.
    """
    claim = _claim_path(lock, stale)
    deadline = time.monotonic() + _CLAIM_WAIT_S
    while True:
        try:
            os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            break
        except FileExistsError:
            pass
        except OSError as err:
            raise RunError(
                f"cannot write to the run directory {lock.parent} ({_reason(err)}): choose "
                "another --out"
            ) from err
        if _read_record(lock) != stale:
            return  # the process that claimed it took it over
        if time.monotonic() > deadline:
            raise RunError(
                f"{lock.parent}: another process began to take over the stale lock {lock} of "
                f"pid {stale.get('pid')} and did not finish; if no run uses {lock.parent}, "
                f"delete {claim} and {lock}"
            )
        time.sleep(0.05)
    try:
        if _read_record(lock) != stale:
            return  # taken over before this process claimed it
        aside = lock.with_name(f"{LOCK_FILE}.stale-{os.getpid()}")
        try:
            os.rename(lock, aside)
        except FileNotFoundError:
            return
        try:
            try:
                moved = json.loads(aside.read_text())
            except (OSError, ValueError):
                moved = None
            if moved != stale:  # deleted by hand and locked again since it was read
                try:
                    os.link(aside, lock)
                except OSError as err:
                    displaced = moved.get("pid") if isinstance(moved, dict) else "unknown"
                    raise RunError(
                        f"{lock.parent}: its lock {lock} changed hands while a stale lock was "
                        f"removed (was it deleted by hand?): pid {displaced} and the holder "
                        "now named in it may both write there; stop one"
                    ) from err
                return
        finally:
            aside.unlink(missing_ok=True)
    finally:
        claim.unlink(missing_ok=True)
    print(
        f"warning: taking over the lock of {lock.parent}: pid {stale.get('pid')} on this "
        f"host, which took it at {stale.get('started')}, {why}",
        file=sys.stderr,
    )


def _acquire(lock: Path, record: dict) -> None:
    for _ in range(5):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            fd = None
        except OSError as err:
            raise RunError(
                f"cannot write to the run directory {lock.parent} ({_reason(err)}): choose "
                "another --out"
            ) from err
        if fd is None:  # held, or left by a dead process: then removed, and tried again
            holder = _read_record(lock)
            if holder is not None:  # else released meanwhile
                _take_over(lock, holder, _stale_because(lock, holder, record))
            continue
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
    file ``run_dir/.lock`` holding ``{"pid", "host", "boot_id", "pid_namespace",
    "process_start", "started", "command"}`` (``command`` defaults to this process's command
    line; the boot id, the PID namespace and the start time of the process in clock ticks
    are read from ``/proc`` and ``None`` where there is none, e.g. on macOS). The lock is
    removed when the block ends, normally or by an exception (``KeyboardInterrupt`` and
    ``SystemExit`` included), and the folders created for it are removed again when they
    are still empty.

    Raises :class:`RunError`, without waiting, when another live process holds the
    directory (naming its pid, host and start time) or when the directory cannot be
    created or written. A lock left by a process of this host, boot and PID namespace that
    no longer runs (killed; its pid gone, or reused by a process that started later) is
    taken over with a warning on stderr, by one process only when several find it at once.
    One from another host, another boot or another PID namespace (another container on a
    shared volume) is never taken over (whether its process lives cannot be told from
    here): the message says to delete it if that run is dead. A lock without these fields
    (written by an earlier version), or any lock where ``/proc`` is missing, is judged by
    its host and pid alone. The lock is re-entrant within a process, and not taken at all
    by the extra processes of a distributed run (:func:`is_secondary_rank`), which re-run
    the command of the process that holds it. A process killed with ``SIGKILL`` leaves its
    lock behind, which the next run on the same host takes over.
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
                "boot_id": _boot_id(),
                "pid_namespace": _pid_namespace(),
                "process_start": _start_time(os.getpid()),
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
# What a split's content hash covers: "arrays" hash the images and labels (or masks) of a split
# together, "files" the names and sizes of its image and annotation files.
_WHAT_CHANGED = {"arrays": "images or labels", "files": "files (names or sizes)"}


def _short(digest: Any) -> str:
    return f"{str(digest)[:8]}..."


def _split_differences(name: str, source: Any, old: Mapping, new: Mapping) -> list[str]:
    """What differs in the split ``name`` besides its content hash: its number of samples,
    its image shape, which split of the data set it is."""
    differences = []
    if old.get("samples") != new.get("samples"):
        differences.append(
            f"the {name} split of {source} now has {new.get('samples')} samples, "
            f"{old.get('samples')} when the run trained"
        )
    if "image_shape" in old and "image_shape" in new and old["image_shape"] != new["image_shape"]:
        differences.append(
            f"the {name} split of {source} now has images of shape {new['image_shape']}, "
            f"{old['image_shape']} when the run trained"
        )
    if "split" in old and "split" in new and old["split"] != new["split"]:
        differences.append(
            f"the {name} split of {source} is now the data set's {new['split']!r} split, "
            f"{old['split']!r} when the run trained"
        )
    return differences


def fingerprint_differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What differs between the fingerprint ``stored`` with a run and ``current`` (the data
    as they are now), one phrase per difference: a split's number of samples, image shape
    or split of the data set, the splits whose content hash differs (the images or labels
    of in-memory data, which one hash covers together; the file names or sizes of a folder
    data set), or, when every split holds the same samples, the split-index hash; and,
    before these, the source when it differs too. Empty when the data are those the run
    read (from wherever they are read now)."""
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
            continue
        split_differences = _split_differences(name, source, old, new)
        differences += split_differences
        if not split_differences and old.get("content_sha256") != new.get("content_sha256"):
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
    if differences and stored.get("source") != source:
        differences.insert(
            0,
            f"the data are read from {source} now, from {stored.get('source')} when the run "
            "trained",
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
