"""Loader for ImageNet-style folders: one sub-directory of image files per class."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np

from .core import DatasetError, DatasetSplits, ImageDataset, split_indices

__all__ = ["FOLDER_LAYOUT", "IMAGE_EXTENSIONS", "load_image_folder"]

FOLDER_LAYOUT = (
    "a directory with train/ and test/ subdirectories each holding one subdirectory of images "
    "(png/jpg/jpeg/bmp/gif/webp) per class, or a directory holding one subdirectory per class"
)
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})


def _fail(path: object, problem: str) -> DatasetError:
    return DatasetError.for_path("folder", path, problem, FOLDER_LAYOUT)


def _class_dirs(directory: Path) -> dict[str, Path]:
    # Hidden directories (.git, .ipynb_checkpoints) are never classes.
    return {
        d.name: d for d in sorted(directory.iterdir()) if d.is_dir() and not d.name.startswith(".")
    }


def _image_files(directory: Path) -> list[Path]:
    """Sorted image files, so the sample order (and hence any seeded split) is reproducible."""
    return sorted(
        f
        for f in directory.iterdir()
        if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_EXTENSIONS
    )


def _scan(split_dirs: list[Path], class_names: list[str]) -> list[tuple[list[Path], np.ndarray]]:
    """List (files, labels) for each split directory, labelling by index into ``class_names``."""
    scanned = []
    for split_dir in split_dirs:
        files: list[Path] = []
        labels: list[int] = []
        for name, class_dir in _class_dirs(split_dir).items():
            found = _image_files(class_dir)
            files.extend(found)
            labels.extend([class_names.index(name)] * len(found))
        scanned.append((files, np.asarray(labels, dtype=np.int64)))
    return scanned


def _decode(files: list[Path], size: tuple[int, int], mode: str, path: object) -> np.ndarray:
    from PIL import Image

    channels = 1 if mode == "L" else 3
    width, height = size
    out = np.empty((len(files), height, width, channels), dtype=np.uint8)
    for i, file in enumerate(files):
        try:
            with Image.open(file) as image:
                image = image.convert(mode)
                if image.size != size:
                    image = image.resize(size, Image.Resampling.BILINEAR)
                out[i] = np.asarray(image).reshape(height, width, channels)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise _fail(path, f"cannot decode {file} ({type(exc).__name__}: {exc})") from exc
    return out


def _probe(files: list[Path], path: object) -> tuple[tuple[int, int], str]:
    """Pick the common size and mode from headers only (cheap: no pixel data is decoded).

    Images are resized to the most common size rather than rejected, because real-world class
    folders routinely contain a few odd-sized images; ties go to the size seen first in sorted
    order.  If every image is greyscale ("L") the dataset stays single channel, otherwise all
    images are converted to RGB so a mixed folder still yields one array.
    """
    from PIL import Image, UnidentifiedImageError

    sizes: Counter[tuple[int, int]] = Counter()
    all_grey = True
    for file in files:
        try:
            with Image.open(file) as image:
                sizes[image.size] += 1
                all_grey = all_grey and image.mode == "L"
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
            raise _fail(path, f"cannot read {file} ({type(exc).__name__}: {exc})") from exc
    return sizes.most_common(1)[0][0], ("L" if all_grey else "RGB")


def load_image_folder(
    path: str | os.PathLike[str], *, test_fraction: float = 0.2, seed: int = 0
) -> DatasetSplits:
    """Load a folder of class sub-folders into uint8 NHWC splits.

    With ``train/`` and ``test/`` sub-directories those splits are used as given (class names are
    the sorted union of both, so a class missing from one split keeps its index).  Otherwise the
    single level of class folders is split with a fixed seeded stratified split (default 80/20)
    so that repeated runs see the same test set.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise _fail(
            path, "directory does not exist" if not directory.exists() else "not a directory"
        )

    split_layout = (directory / "train").is_dir() and (directory / "test").is_dir()
    roots = [directory / "train", directory / "test"] if split_layout else [directory]
    class_names = sorted({name for root in roots for name in _class_dirs(root)})
    if not class_names:
        raise _fail(path, "no class subdirectories found")
    scanned = _scan(roots, class_names)
    all_files = [file for files, _ in scanned for file in files]
    for root, (files, _) in zip(roots, scanned, strict=True):
        if not files:
            raise _fail(path, f"no image files found under {root}")
    size, mode = _probe(all_files, path)

    if split_layout:
        (train_files, y_train), (test_files, y_test) = scanned
        x_train = _decode(train_files, size, mode, path)
        x_test = _decode(test_files, size, mode, path)
    else:
        files, labels = scanned[0]
        if len(files) < 2:
            raise _fail(path, "need at least 2 images to make a train/test split")
        images = _decode(files, size, mode, path)
        train_idx, test_idx = split_indices(labels, test_fraction, seed)
        x_train, y_train = images[train_idx], labels[train_idx]
        x_test, y_test = images[test_idx], labels[test_idx]
    return DatasetSplits(
        name=directory.resolve().name,
        train=ImageDataset(x_train, y_train, class_names),
        test=ImageDataset(x_test, y_test, list(class_names)),
    )
