"""Fashion-MNIST from its IDX files, read without any downloader.

The four official files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally ``.gz``) are looked
up, in order, in:

1. the ``root`` argument, when given (then only there);
2. ``$ANCHORLEARN_DATA/fashion-mnist``;
3. ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``);
4. ``${XDG_CACHE_HOME:-~/.cache}/anchorlearn/debian/usr/share/datasets/fashion-mnist``
   (where ``scripts/install_data.sh`` unpacks the package without root).

Loaded arrays are cached in-process and returned read-only.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

__all__ = [
    "FASHION_MNIST_CLASSES",
    "SYSTEM_DIR",
    "fashion_mnist_search_dirs",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "read_idx",
]

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# IDX type codes (third magic byte) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_CACHE: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (raw or gzip-compressed) into a numpy array.

    Format: two zero bytes, a type code (``0x08`` = uint8, ...), the number of dimensions
    ``d``; then ``d`` big-endian int32 sizes; then the data in C order.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: bad magic bytes, unknown type code, or a data length that does not
            match the declared dimensions; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    with path.open("rb") as fh:
        is_gzip = fh.read(2) == b"\x1f\x8b"
    opener = gzip.open if is_gzip else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise ValueError(
            f"{path}: corrupt or truncated gzip file ({' '.join(str(err).split())}); "
            "download or reinstall it"
        ) from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"{path}: not an IDX file: expected magic bytes 00 00 <type> <ndim>, "
            f"got {raw[:4].hex(' ') or 'an empty file'}"
        )
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        known = ", ".join(f"0x{code:02X}" for code in _IDX_DTYPES)
        raise ValueError(
            f"{path}: unknown IDX type code: expected one of {known}, got 0x{type_code:02X}"
        )
    header_end = 4 + 4 * ndim
    if len(raw) < header_end:
        raise ValueError(
            f"{path}: truncated IDX header: expected {header_end} bytes for {ndim} "
            f"dimensions, got {len(raw)}"
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - header_end
    if got != expected:
        raise ValueError(
            f"{path}: IDX data length does not match dimensions {shape}: expected {expected} "
            f"bytes, got {got}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_end).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=True)


def fashion_mnist_search_dirs(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """The directories searched for the IDX files, in order (see the module docstring)."""
    if root is not None:
        return [Path(root)]
    dirs = []
    env = os.environ.get("ANCHORLEARN_DATA")
    if env:
        dirs.append(Path(env) / "fashion-mnist")
    dirs.append(SYSTEM_DIR)
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    dirs.append(cache_home / "anchorlearn" / "debian" / SYSTEM_DIR.relative_to("/"))
    return dirs


def _find_file(directory: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        candidate = directory / name
        if candidate.is_file():
            return candidate
    return None


def find_fashion_mnist(split: str, root: str | os.PathLike[str] | None = None) -> tuple[Path, Path]:
    """Paths of the (images, labels) IDX files of ``split``, from the first directory that
    holds all four files (both splits), so that the training and test splits never come
    from two different copies.

    Raises:
        FileNotFoundError: none of the searched directories holds them; the message lists
            every directory searched and how to install the data.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    image_stem, label_stem = _FILES[split]
    searched = fashion_mnist_search_dirs(root)
    for directory in searched:
        found = [_find_file(directory, stem) for stems in _FILES.values() for stem in stems]
        if all(path is not None for path in found):
            return _find_file(directory, image_stem), _find_file(directory, label_stem)  # type: ignore[return-value]
    places = "\n".join(f"  - {d}" for d in searched)
    raise FileNotFoundError(
        f"Fashion-MNIST files not found: no directory holds all four ({split}: "
        f"{image_stem}[.gz], {label_stem}[.gz], and those of the other split). "
        f"Searched:\n{places}\n"
        "Fix: run `make data` (or `bash scripts/install_data.sh`), or put the four official "
        "IDX files in DIR/fashion-mnist and set ANCHORLEARN_DATA=DIR."
    )


def load_fashion_mnist(
    split: str = "train", root: str | os.PathLike[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load a Fashion-MNIST split.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images).
        root: a directory holding the IDX files; when ``None`` the default places are
            searched (module docstring).

    Returns:
        ``(images, labels)``: read-only arrays, uint8 ``(N, 28, 28)`` and int64 ``(N,)``.
        Class names are :data:`FASHION_MNIST_CLASSES`.
    """
    image_path, label_path = find_fashion_mnist(split, root)
    key = (str(image_path.resolve()), str(label_path.resolve()))
    if key not in _CACHE:
        images = read_idx(image_path)
        labels = read_idx(label_path)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"{image_path}: expected uint8 images of shape (N, H, W), "
                f"got {images.dtype} {images.shape}"
            )
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(
                f"{label_path}: expected {len(images)} labels of shape (N,), got {labels.shape}"
            )
        labels = labels.astype(np.int64)
        images.setflags(write=False)
        labels.setflags(write=False)
        _CACHE[key] = (images, labels)
    return _CACHE[key]
