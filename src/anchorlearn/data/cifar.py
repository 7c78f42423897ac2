"""CIFAR-10 in the two layouts users have: the official python batches and class folders.

The official batches (``cifar-10-python.tar.gz``) are pickles of numpy arrays. They are read
here without numpy's own unpickling: the few globals such a file names (numpy's array and
dtype reconstructors, ``_codecs.encode`` for bytes written by Python 3) are replaced by
stand-ins that only record their arguments, and the arrays are then built by
:func:`numpy.frombuffer` from raw bytes of a plain integer dtype, with their length checked
against their shape. A file naming any other global is refused, and nothing in a file is
ever called, evaluated or formatted into a message: a batch file is data.
"""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path

import numpy as np

from anchorlearn.data.sources import ClassificationData, _check_dir, load_image_folder

__all__ = ["CIFAR10_CLASSES", "load_cifar10"]

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

_BATCHES = "cifar-10-batches-py"
_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_SIDE = 32
# the dtypes an array of a batch may have: plain integers (pixels, labels)
_INTEGER_CODES = frozenset({"u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8"})
_BYTE_ORDERS = frozenset({"<", ">", "|", "="})


class _PickledDtype:
    """Stands in for ``numpy.dtype(code, align, copy)``: records an integer type code and,
    from the pickle's state, its byte order."""

    __slots__ = ("code", "order")

    def __init__(self, code: object, *args: object) -> None:
        if not isinstance(code, str) or code not in _INTEGER_CODES:
            raise pickle.UnpicklingError("an array's dtype must be a plain integer type")
        self.code = code
        self.order = "|"

    def __setstate__(self, state: object) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in _BYTE_ORDERS:
            self.order = state[1]

    def numpy(self) -> np.dtype:
        return np.dtype(("<" if self.order == "=" else self.order) + self.code)


class _PickledArray:
    """Stands in for an ``ndarray`` being unpickled: keeps the pickle's state
    ``(version, shape, dtype, fortran_order, raw_bytes)`` for :func:`_to_array`."""

    __slots__ = ("state",)

    def __init__(self, *args: object) -> None:
        self.state: object = None

    def __setstate__(self, state: object) -> None:
        self.state = state


def _reconstruct(*args: object) -> _PickledArray:
    """Stands in for ``numpy.core.multiarray._reconstruct``: the state comes next."""
    return _PickledArray()


def _frombuffer(buffer: object, dtype: object, shape: object, order: object) -> _PickledArray:
    """Stands in for numpy's protocol-5 ``_frombuffer(buffer, dtype, shape, order)``."""
    array = _PickledArray()
    raw = bytes(buffer) if isinstance(buffer, bytes | bytearray | pickle.PickleBuffer) else None
    array.state = (1, shape, dtype, order == "F", raw)
    return array


def _encode(text: object, encoding: object = "latin1") -> bytes:
    """Stands in for ``_codecs.encode``, which Python 3 uses to write bytes into a protocol
    2 pickle: ``text.encode("latin1")``, the only encoding it writes them with."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("bytes must be written as latin-1 text")
    return text.encode("latin1")


_STAND_INS: dict[tuple[str, str], object] = {
    ("numpy", "ndarray"): _PickledArray,
    ("numpy", "dtype"): _PickledDtype,
    ("_codecs", "encode"): _encode,
}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _STAND_INS[(_module, "_reconstruct")] = _reconstruct
for _module in ("numpy.core.numeric", "numpy._core.numeric"):
    _STAND_INS[(_module, "_frombuffer")] = _frombuffer


class _BatchUnpickler(pickle.Unpickler):
    """Resolves the globals of a batch file to :data:`_STAND_INS` and refuses any other."""

    def find_class(self, module: str, name: str) -> object:
        try:
            return _STAND_INS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def _to_array(value: _PickledArray, path: Path, key: str) -> np.ndarray:
    state = value.state
    if not (isinstance(state, tuple) and len(state) == 5):
        raise ValueError(f"{path}: {key!r} is not a numpy array of integers")
    _, shape, dtype, fortran, raw = state
    if not isinstance(dtype, _PickledDtype) or not isinstance(raw, bytes):
        raise ValueError(f"{path}: {key!r} is not a numpy array of integers")
    if not (
        isinstance(shape, tuple)
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise ValueError(f"{path}: {key!r} has no valid shape")
    numpy_dtype = dtype.numpy()
    if math.prod(shape) * numpy_dtype.itemsize != len(raw):
        raise ValueError(
            f"{path}: {key!r} claims shape {shape} of {numpy_dtype} but holds {len(raw)} bytes"
        )
    array = np.frombuffer(raw, numpy_dtype).reshape(shape, order="F" if fortran else "C")
    return array.astype(numpy_dtype.newbyteorder("="), copy=True)


def _read_batch(path: Path) -> dict[str, object]:
    """The mapping one batch file holds, arrays as numpy arrays, keys as ``str``."""
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 batch not found: {path}")
    try:
        with path.open("rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise ValueError(
            f"{path}: not a CIFAR-10 python batch ({type(err).__name__}: {err}); download "
            "cifar-10-python.tar.gz again and extract it"
        ) from None
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: not a CIFAR-10 python batch (a {type(batch).__name__})")
    out: dict[str, object] = {}
    for key, value in batch.items():
        # the keys are bytes in the official files, str in re-pickled copies
        if isinstance(key, bytes):
            key = key.decode("latin1")
        if not isinstance(key, str):
            raise ValueError(
                f"{path}: not a CIFAR-10 python batch (a key is a {type(key).__name__})"
            )
        out[key] = _to_array(value, path, key) if isinstance(value, _PickledArray) else value
    return out


def _integer_list(value: object) -> np.ndarray | None:
    """``value`` (an integer array or a list of ints) as an int64 array, else ``None``."""
    if isinstance(value, np.ndarray):
        return value.astype(np.int64) if value.ndim == 1 else None
    if isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return np.asarray(value, dtype=np.int64)
    return None


def _batch_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 ``(N, 32, 32, 3)`` images and int64 labels of one official python batch."""
    batch = _read_batch(path)
    missing = [key for key in ("data", "labels") if key not in batch]
    if missing:
        raise ValueError(f"{path}: missing {missing} (keys: {sorted(batch)})")
    data = batch["data"]
    size = 3 * _SIDE * _SIDE
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 2
        and data.shape[1] == size
    ):
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(
            f"{path}: 'data' must be uint8 (N, {size}) rows of 32x32 RGB planes, got {got}"
        )
    labels = _integer_list(batch["labels"])
    if labels is None or labels.shape != (len(data),):
        raise ValueError(
            f"{path}: 'labels' must be {len(data)} integers (one per row of 'data')"
            + ("" if labels is None else f", got {len(labels)}")
        )
    bad = np.flatnonzero((labels < 0) | (labels >= len(CIFAR10_CLASSES)))
    if len(bad):
        raise ValueError(f"{path}: labels must be in 0..9, got {labels[bad[0]]} at row {bad[0]}")
    # each row holds the red, then the green, then the blue 32x32 plane, row-major
    images = data.reshape(-1, 3, _SIDE, _SIDE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _class_names(batch_dir: Path) -> list[str]:
    meta = batch_dir / "batches.meta"
    if not meta.is_file():
        return list(CIFAR10_CLASSES)
    names = _read_batch(meta).get("label_names")
    if not (
        isinstance(names, list)
        and len(names) == len(CIFAR10_CLASSES)
        and all(isinstance(n, bytes | str) for n in names)
    ):
        what = f"{len(names)} items" if isinstance(names, list) else type(names).__name__
        raise ValueError(f"{meta}: 'label_names' must list the 10 class names, got {what}")
    return [n.decode("latin1") if isinstance(n, bytes) else n for n in names]


def _load_batches(batch_dir: Path) -> tuple[ClassificationData, ClassificationData]:
    names = _class_names(batch_dir)
    parts = [_batch_arrays(batch_dir / name) for name in _TRAIN_FILES]
    train = ClassificationData(
        np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), names
    )
    test = ClassificationData(*_batch_arrays(batch_dir / "test_batch"), names)
    return train, test


def load_cifar10(
    root: str | os.PathLike[str],
) -> tuple[ClassificationData, ClassificationData]:
    """CIFAR-10's 50,000 training and 10,000 test images, uint8 ``(N, 32, 32, 3)``.

    ``root`` holds either layout:

    * the official python batches (``cifar-10-python.tar.gz`` extracted):
      ``data_batch_1`` .. ``data_batch_5``, ``test_batch`` and ``batches.meta``, in
      ``root`` or in ``root/cifar-10-batches-py``; re-pickled copies (any protocol) are
      read too, as long as they hold the same dicts of integer arrays and lists;
    * image folders ``root/train/<class>/*`` and ``root/test/<class>/*`` (the same class
      folders in both).

    Returns:
        ``(train, test)``.
    """
    root = Path(root)
    _check_dir(root, "CIFAR-10 folder")
    for batch_dir in (root / _BATCHES, root):
        if (batch_dir / "test_batch").is_file() or (batch_dir / "data_batch_1").is_file():
            return _load_batches(batch_dir)
    if (root / "train").is_dir() and (root / "test").is_dir():
        train, test = load_image_folder(root / "train"), load_image_folder(root / "test")
        if train.class_names != test.class_names:
            raise ValueError(
                f"{root}: the class folders of train/ ({train.class_names}) and test/ "
                f"({test.class_names}) differ"
            )
        return train, test
    raise FileNotFoundError(
        f"CIFAR-10 not found under {root}: expected the python batches (data_batch_1..5, "
        f"test_batch) in {root} or {root / _BATCHES}, or image folders "
        f"{root / 'train'}/<class>/ and {root / 'test'}/<class>/"
    )
