"""Loader for the IDX format used by MNIST, Fashion-MNIST, KMNIST and EMNIST."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from .core import DatasetError, DatasetSplits, ImageDataset, class_names_for

__all__ = ["IDX_LAYOUT", "load_idx", "parse_idx"]

IDX_LAYOUT = (
    "a directory with train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte "
    "and t10k-labels-idx1-ubyte (each optionally .gz, any name prefix such as 'fashion-')"
)

_IMAGES_MAGIC = 0x00000803  # unsigned byte data, 3 dimensions
_LABELS_MAGIC = 0x00000801  # unsigned byte data, 1 dimension

# (role, glob stems).  EMNIST names its test files "...-test-..." rather than "t10k".
_ROLES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("train images", ("*train-images*idx3-ubyte",)),
    ("train labels", ("*train-labels*idx1-ubyte",)),
    ("test images", ("*t10k-images*idx3-ubyte", "*test-images*idx3-ubyte")),
    ("test labels", ("*t10k-labels*idx1-ubyte", "*test-labels*idx1-ubyte")),
)


def _fail(path: object, problem: str) -> DatasetError:
    return DatasetError.for_path("idx", path, problem, IDX_LAYOUT)


def parse_idx(data: bytes, expected_magic: int, name: str, path: object) -> np.ndarray:
    """Decode one uint8 IDX payload, checking the header against the payload length.

    The length check is what catches a truncated download; without it ``np.frombuffer`` would
    either fail with an unhelpful message or, worse, reshape garbage.
    """
    if len(data) < 4:
        raise _fail(path, f"{name} is too short to hold an IDX header ({len(data)} bytes)")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise _fail(path, f"{name} has magic 0x{magic:08x}, not 0x{expected_magic:08x}")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise _fail(path, f"{name} is truncated inside its header")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    count = int(np.prod(dims, dtype=np.int64))
    if len(data) != header + count:
        raise _fail(
            path,
            f"{name} holds {len(data) - header} data bytes but its header {dims} needs {count}"
            + (" (truncated file)" if len(data) < header + count else ""),
        )
    # Copy so the result is writable (``torch.from_numpy`` warns on read-only buffers).
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def _find(directory: Path, role: str, patterns: tuple[str, ...], path: object) -> Path:
    """Find the single file playing ``role``, preferring the uncompressed copy when both exist."""
    stems: dict[str, list[Path]] = {}
    for pattern in patterns:
        for candidate in [*directory.glob(pattern), *directory.glob(pattern + ".gz")]:
            if candidate.is_file():
                stem = candidate.name.removesuffix(".gz")
                stems.setdefault(stem, []).append(candidate)
    if not stems:
        raise _fail(path, f"no {role} file found")
    if len(stems) > 1:
        # Several datasets in one folder (e.g. EMNIST splits): guessing would silently mix them.
        raise _fail(path, f"ambiguous {role} files: {', '.join(sorted(stems))}")
    (files,) = stems.values()
    return min(files, key=lambda f: f.suffix == ".gz")


def _read(file: Path, path: object) -> bytes:
    try:
        if file.suffix == ".gz":
            with gzip.open(file, "rb") as handle:
                return handle.read()
        return file.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise _fail(path, f"cannot read {file.name} ({type(exc).__name__}: {exc})") from exc


def load_idx(path: str | os.PathLike[str]) -> DatasetSplits:
    """Load an MNIST-family directory of IDX files into (N, 28, 28, 1) uint8 splits.

    Class names are "0".."K-1" with K = largest label + 1, which is the right thing for MNIST,
    Fashion-MNIST and KMNIST; pass the result through ``dataclasses.replace`` for nicer names.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise _fail(
            path, "directory does not exist" if not directory.exists() else "not a directory"
        )
    arrays = []
    for role, patterns in _ROLES:
        file = _find(directory, role, patterns, path)
        magic = _IMAGES_MAGIC if role.endswith("images") else _LABELS_MAGIC
        arrays.append(parse_idx(_read(file, path), magic, file.name, path))
    x_train, y_train, x_test, y_test = arrays
    for split, images, labels in (("train", x_train, y_train), ("test", x_test, y_test)):
        if images.shape[0] != labels.shape[0]:
            raise _fail(path, f"{split} has {images.shape[0]} images but {labels.shape[0]} labels")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise _fail(path, f"train images are {x_train.shape[1:]} but test are {x_test.shape[1:]}")
    names = class_names_for(y_train, y_test)
    return DatasetSplits(
        name=directory.resolve().name,
        train=ImageDataset(x_train[..., None], y_train.astype(np.int64), names),
        test=ImageDataset(x_test[..., None], y_test.astype(np.int64), list(names)),
    )
