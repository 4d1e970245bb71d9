"""Loader for the CIFAR-10 / CIFAR-100 "python version" pickles, without trusting pickle.

The official archives are Python pickles, and unpickling runs arbitrary callables named in the
file.  A dataset downloaded from a mirror is untrusted input, so we unpickle through an
allow-list that admits only what numpy needs to rebuild arrays.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .core import DatasetError, DatasetSplits, ImageDataset

__all__ = [
    "CIFAR100_LAYOUT",
    "CIFAR10_LAYOUT",
    "RestrictedUnpickler",
    "load_cifar",
    "restricted_load",
]

CIFAR10_LAYOUT = (
    "a cifar-10-batches-py directory (or its parent) holding the pickles data_batch_1 .. "
    "data_batch_5, test_batch and batches.meta"
)
CIFAR100_LAYOUT = (
    "a cifar-100-python directory (or its parent) holding the pickles train, test and meta"
)
_ANY_LAYOUT = f"{CIFAR10_LAYOUT}, or {CIFAR100_LAYOUT}"

_CIFAR10_DIR, _CIFAR100_DIR = "cifar-10-batches-py", "cifar-100-python"
_CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
_CIFAR100_FILES = ("train", "test", "meta")
_SIDE, _PIXELS = 32, 3 * 32 * 32


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode``, which Python 3 emits for bytes in protocol <= 2 pickles.

    Only the latin-1 round trip that pickle itself uses is allowed, so the codec registry (which
    can hold arbitrary third-party codecs) is never reachable from a file.
    """
    if not isinstance(text, str) or encoding.replace("-", "").lower() != "latin1":
        raise pickle.UnpicklingError("refusing _codecs.encode with unexpected arguments")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """Map each permitted (module, name) to the object it stands for.

    Built on first use (not at import) and resolved against whichever numpy is installed, so a
    pickle written under numpy 1.x (``numpy.core``) loads under numpy 2.x (``numpy._core``) and
    vice versa, without importing the deprecated ``numpy.core`` shim.
    """
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]

    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        # Protocol-5 pickles (Python 3.14's default) rebuild arrays through _frombuffer.
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose ``find_class`` only resolves numpy array reconstruction helpers.

    Anything else (``os.system``, ``builtins.eval``, ...) raises :class:`DatasetError` before
    the referenced object is even imported, so a malicious file cannot run code.
    """

    def __init__(self, file: BinaryIO, *, kind: str, path: object, expected: str) -> None:
        super().__init__(file, encoding="bytes")  # the official files are Python 2 pickles
        self._kind, self._path, self._expected = kind, path, expected
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DatasetError.for_path(
                self._kind,
                self._path,
                f"refusing to unpickle untrusted global '{module}.{name}'",
                self._expected,
            ) from None


def restricted_load(file: Path, *, kind: str, path: object, expected: str) -> Any:
    """Unpickle ``file`` with :class:`RestrictedUnpickler`, mapping every failure to one error."""
    try:
        with open(file, "rb") as handle:
            return RestrictedUnpickler(handle, kind=kind, path=path, expected=expected).load()
    except DatasetError:
        raise
    except Exception as exc:  # corrupt pickles raise a wide variety of exception types
        problem = f"cannot unpickle {file.name} ({type(exc).__name__}: {exc})"
        raise DatasetError.for_path(kind, path, problem, expected) from exc


def _field(record: dict[Any, Any], key: str) -> Any:
    """Look a key up as bytes first (official files) and then as str (re-pickled copies)."""
    for candidate in (key.encode("ascii"), key):
        if candidate in record:
            return record[candidate]
    raise KeyError(key)


class _Reader:
    """Bundles the error context so the parsing helpers stay short."""

    def __init__(self, kind: str, path: object, root: Path, expected: str) -> None:
        self.kind, self.path, self.root, self.expected = kind, path, root, expected

    def fail(self, problem: str) -> DatasetError:
        return DatasetError.for_path(self.kind, self.path, problem, self.expected)

    def record(self, name: str, keys: tuple[str, ...]) -> dict[Any, Any]:
        obj = restricted_load(
            self.root / name, kind=self.kind, path=self.path, expected=self.expected
        )
        if not isinstance(obj, dict):
            raise self.fail(f"{name} holds a {type(obj).__name__}, not a dict")
        for key in keys:
            try:
                _field(obj, key)
            except KeyError:
                raise self.fail(f"{name} has no '{key}' entry") from None
        return obj

    def batch(self, name: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
        """Decode one batch: rows are 1024 red, then green, then blue bytes of a 32x32 image."""
        record = self.record(name, ("data", label_key))
        data = np.asarray(_field(record, "data"))
        labels = np.asarray(_field(record, label_key))
        if data.ndim != 2 or data.shape[1] != _PIXELS:
            raise self.fail(f"{name} data has shape {data.shape}, not (N, {_PIXELS})")
        if data.dtype != np.uint8:
            if not np.issubdtype(data.dtype, np.integer) or (
                data.size and (data.min() < 0 or data.max() > 255)
            ):
                raise self.fail(f"{name} data is {data.dtype}, not uint8 pixels")
            data = data.astype(np.uint8)
        if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
            raise self.fail(f"{name} '{label_key}' is not a flat list of integers")
        if labels.shape[0] != data.shape[0]:
            raise self.fail(f"{name} has {data.shape[0]} images but {labels.shape[0]} labels")
        images = data.reshape(-1, 3, _SIDE, _SIDE).transpose(0, 2, 3, 1)
        return np.ascontiguousarray(images), labels.astype(np.int64)

    def names(self, name: str, key: str) -> list[str]:
        raw = _field(self.record(name, (key,)), key)
        try:
            return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in raw]
        except (TypeError, UnicodeDecodeError) as exc:
            raise self.fail(f"{name} '{key}' is not a list of class names") from exc

    def dataset(self, images: np.ndarray, labels: np.ndarray, names: list[str]) -> ImageDataset:
        if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
            raise self.fail(f"labels range beyond the {len(names)} class names")
        return ImageDataset(images, labels, names)


def _locate(directory: Path, subdir: str, files: tuple[str, ...]) -> Path | None:
    for candidate in (directory, directory / subdir):
        if all((candidate / name).is_file() for name in files):
            return candidate
    return None


def load_cifar(path: str | os.PathLike[str], variant: str | None = None) -> DatasetSplits:
    """Load extracted CIFAR-10 or CIFAR-100 python pickles as (N, 32, 32, 3) uint8 splits.

    ``variant`` ("cifar10" / "cifar100") pins the expected dataset; by default it is detected
    from the files present.  CIFAR-100 uses the 100 fine labels, the standard benchmark setting.
    """
    if variant not in (None, "cifar10", "cifar100"):
        raise ValueError(f"variant must be None, 'cifar10' or 'cifar100', got {variant!r}")
    kind = variant or "cifar"
    expected = {"cifar10": CIFAR10_LAYOUT, "cifar100": CIFAR100_LAYOUT}.get(kind, _ANY_LAYOUT)
    directory = Path(path)
    if not directory.is_dir():
        problem = "directory does not exist" if not directory.exists() else "not a directory"
        if directory.is_file() and directory.name.endswith((".tar.gz", ".tgz", ".tar")):
            problem = "this is the archive; extract it first"
        raise DatasetError.for_path(kind, path, problem, expected)

    root10 = _locate(directory, _CIFAR10_DIR, _CIFAR10_FILES) if variant != "cifar100" else None
    root100 = _locate(directory, _CIFAR100_DIR, _CIFAR100_FILES) if variant != "cifar10" else None
    if root10 is None and root100 is None:
        raise DatasetError.for_path(kind, path, "required pickle files not found", expected)
    if root10 is not None and root100 is not None:
        problem = "both CIFAR-10 and CIFAR-100 files found; pass the cifar10 or cifar100 kind"
        raise DatasetError.for_path(kind, path, problem, expected)

    if root10 is not None:
        reader = _Reader(kind, path, root10, expected)
        names = reader.names("batches.meta", "label_names")
        parts = [reader.batch(f"data_batch_{i}", "labels") for i in range(1, 6)]
        x_train = np.concatenate([images for images, _ in parts])
        y_train = np.concatenate([labels for _, labels in parts])
        x_test, y_test = reader.batch("test_batch", "labels")
        name = "cifar10"
    else:
        assert root100 is not None
        reader = _Reader(kind, path, root100, expected)
        names = reader.names("meta", "fine_label_names")
        x_train, y_train = reader.batch("train", "fine_labels")
        x_test, y_test = reader.batch("test", "fine_labels")
        name = "cifar100"
    return DatasetSplits(
        name=name,
        train=reader.dataset(x_train, y_train, names),
        test=reader.dataset(x_test, y_test, list(names)),
    )
