"""Image folders: ImageNet's ``train/`` + ``val/`` layout, or class folders split by a seed.

Only the directory tree is read here (file names, no pixels); images are decoded one at a time
when a batch needs them, see :class:`~visionmoe.data.files.ImageFiles`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .core import DatasetError, DatasetSplits, Subset, split_indices
from .files import ImageFiles

__all__ = ["FOLDER_LAYOUT", "IMAGE_EXTENSIONS", "load_image_folder"]

FOLDER_LAYOUT = (
    "a directory holding train/ and val/ (or test/), each with one subdirectory of images "
    "(png/jpg/jpeg/bmp/gif/webp) per class, or a directory holding one subdirectory of images "
    "per class (split by a seeded fraction)"
)
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
_EVAL_SPLITS = ("val", "test")


def _fail(path: object, problem: str) -> DatasetError:
    return DatasetError.for_path("folder", path, problem, FOLDER_LAYOUT)


def _visible(entry: os.DirEntry) -> bool:
    return not entry.name.startswith(".")  # .git, .ipynb_checkpoints, .DS_Store


def _class_dirs(directory: Path) -> dict[str, Path]:
    with os.scandir(directory) as it:
        found = {e.name: Path(e.path) for e in it if _visible(e) and e.is_dir()}
    return dict(sorted(found.items()))


def _is_image(entry: os.DirEntry) -> bool:
    return (
        _visible(entry)
        and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS
        and entry.is_file()
    )


def _scan_split(
    split_dir: Path, class_names: list[str], path: object
) -> tuple[list[str], np.ndarray]:
    """Relative file names and labels of one split, in sorted (reproducible) order."""
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue  # a class may be absent from one split; it keeps its index
        with os.scandir(class_dir) as it:
            names = sorted(e.name for e in it if _is_image(e))
        if not names:
            raise _fail(path, f"class folder {class_dir} holds no image files")
        files.extend(f"{name}/{n}" for n in names)
        labels.extend([label] * len(names))
    if not files:
        raise _fail(path, f"no image files found under {split_dir}")
    return files, np.asarray(labels, dtype=np.int64)


def _loose_images(directory: Path) -> bool:
    with os.scandir(directory) as it:
        return any(_is_image(e) for e in it)


def load_image_folder(
    path: str | os.PathLike[str], *, test_fraction: float = 0.2, seed: int = 0
) -> DatasetSplits:
    """Index a folder of class sub-folders as train/test :class:`ImageFiles` splits.

    With ``train/`` and ``val/`` (or ``test/``; ``val/`` wins when both exist) those splits are
    used as given; class names are the sorted union over both, so a class missing from one split
    keeps its index.  Otherwise the single level of class folders is split with a seeded,
    stratified split (default 80/20), so repeated runs see the same test set.  Images keep their
    own sizes and are decoded to RGB when read.  A missing evaluation split, an empty class
    folder, or images lying where class folders are expected raise :class:`DatasetError` naming
    the path and the expected layout.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise _fail(
            path, "directory does not exist" if not directory.exists() else "not a directory"
        )
    train_dir = directory / "train"
    eval_dir = next((directory / s for s in _EVAL_SPLITS if (directory / s).is_dir()), None)
    if train_dir.is_dir() and eval_dir is None:
        raise _fail(path, f"found {train_dir} but no {directory / 'val'} or {directory / 'test'}")
    roots = [train_dir, eval_dir] if eval_dir is not None else [directory]
    for root in roots:
        if _loose_images(root):
            raise _fail(path, f"image files lie directly in {root} instead of in class folders")
    class_names = sorted({name for root in roots for name in _class_dirs(root)})
    if not class_names:
        raise _fail(path, "no class subdirectories found")
    scanned = [_scan_split(root, class_names, path) for root in roots]
    name = directory.resolve().name
    if eval_dir is not None:
        (train_files, y_train), (test_files, y_test) = scanned
        return DatasetSplits(
            name=name,
            train=ImageFiles(train_files, y_train, class_names, root=train_dir),
            test=ImageFiles(test_files, y_test, class_names, root=eval_dir),
        )
    files, labels = scanned[0]
    if len(files) < 2:
        raise _fail(path, "need at least 2 images to make a train/test split")
    everything = ImageFiles(files, labels, class_names, root=directory)
    train_idx, test_idx = split_indices(labels, test_fraction, seed)
    return DatasetSplits(
        name=name, train=Subset(everything, train_idx), test=Subset(everything, test_idx)
    )
