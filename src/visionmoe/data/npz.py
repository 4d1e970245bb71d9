"""Loader for ``.npz`` archives in the Keras ``x_train/y_train/x_test/y_test`` convention."""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .core import DatasetError, DatasetSplits, ImageDataset, class_names_for

__all__ = ["FASHION_MNIST_CLASS_NAMES", "NPZ_LAYOUT", "load_npz"]

NPZ_LAYOUT = (
    "an .npz file with arrays x_train and x_test of shape (N,H,W) or (N,H,W,C) (uint8, or float "
    "in [0,1]) and integer labels y_train and y_test of shape (N,)"
)

# The npz convention carries no class names; these are the official Fashion-MNIST ones so callers
# can label plots and confusion matrices without copying them around.
FASHION_MNIST_CLASS_NAMES: tuple[str, ...] = (
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

_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _fail(path: object, problem: str) -> DatasetError:
    return DatasetError.for_path("npz", path, problem, NPZ_LAYOUT)


def _as_images(x: np.ndarray, key: str, path: object) -> np.ndarray:
    """Coerce to uint8 NHWC, refusing anything that would silently change the pixel values."""
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[3] not in (1, 3):
        raise _fail(path, f"{key} has shape {x.shape}, not (N,H,W) or (N,H,W,C) with C in {{1,3}}")
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.floating):
        if x.size and (not np.isfinite(x).all() or x.min() < 0.0 or x.max() > 1.0):
            raise _fail(path, f"{key} is floating point but not within [0, 1]")
        return np.rint(x * 255.0).astype(np.uint8)
    if np.issubdtype(x.dtype, np.integer) and not np.issubdtype(x.dtype, np.bool_):
        if x.size and (x.min() < 0 or x.max() > 255):
            raise _fail(path, f"{key} is {x.dtype} with values outside 0..255")
        return x.astype(np.uint8)
    raise _fail(path, f"{key} has unsupported dtype {x.dtype}")


def _as_labels(y: np.ndarray, key: str, n: int, path: object) -> np.ndarray:
    # Keras' CIFAR npz files store labels as (N, 1); accept that rather than make users reshape.
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise _fail(path, f"{key} must be a 1-D integer array, got {y.dtype} {y.shape}")
    if y.shape[0] != n:
        raise _fail(path, f"{key} has {y.shape[0]} labels but there are {n} images")
    if y.size and y.min() < 0:
        raise _fail(path, f"{key} contains negative labels")
    return y.astype(np.int64, copy=False)


def load_npz(
    path: str | os.PathLike[str], class_names: Sequence[str] | None = None
) -> DatasetSplits:
    """Load an ``.npz`` archive (e.g. ``fashion_mnist.npz``) into train/test splits.

    ``allow_pickle=False`` is deliberate: object arrays in an npz are pickles and could execute
    code.  Class names come from ``class_names`` if given, else from a string array named
    ``class_names`` inside the archive, else "0".."K-1".
    """
    file = Path(path)
    if not file.is_file():
        raise _fail(path, "file does not exist" if not file.exists() else "not a regular file")
    try:
        # Open the file ourselves: np.load leaks its own handle when the zip directory is bad.
        with open(file, "rb") as handle:
            loaded = np.load(handle, allow_pickle=False)
            if isinstance(loaded, np.ndarray):
                raise _fail(path, "file holds a single .npy array, not an .npz archive")
            with loaded as archive:
                missing = [key for key in _KEYS if key not in archive.files]
                if missing:
                    raise _fail(path, f"missing array(s) {', '.join(missing)}")
                arrays = {key: archive[key] for key in _KEYS}
                stored = archive["class_names"] if "class_names" in archive.files else None
    except DatasetError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, zlib.error) as exc:
        raise _fail(path, f"unreadable archive ({type(exc).__name__}: {exc})") from exc

    x_train = _as_images(arrays["x_train"], "x_train", path)
    x_test = _as_images(arrays["x_test"], "x_test", path)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise _fail(
            path, f"x_train images are {x_train.shape[1:]} but x_test are {x_test.shape[1:]}"
        )
    y_train = _as_labels(arrays["y_train"], "y_train", len(x_train), path)
    y_test = _as_labels(arrays["y_test"], "y_test", len(x_test), path)

    names = class_names_for(y_train, y_test)
    if class_names is None and stored is not None:
        if stored.ndim == 1 and stored.dtype.kind in "US":
            class_names = [str(n, "utf-8") if isinstance(n, bytes) else str(n) for n in stored]
    if class_names is not None:
        if len(class_names) < len(names):
            raise _fail(
                path,
                f"{len(class_names)} class names given but labels go up to {len(names) - 1}",
            )
        names = [str(n) for n in class_names]
    return DatasetSplits(
        name=file.stem,
        train=ImageDataset(x_train, y_train, names),
        test=ImageDataset(x_test, y_test, list(names)),
    )
