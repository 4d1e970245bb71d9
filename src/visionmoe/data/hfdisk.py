"""A Hugging Face ``datasets`` dataset saved on local disk (``save_to_disk``), read per sample.

Needs the optional ``datasets`` package (``pip install 'visionmoe[hf]'``).  Only
``load_from_disk`` is used, so nothing is ever downloaded.  The Arrow files are memory-mapped;
images stay encoded until ``read`` decodes one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .core import DatasetError, DatasetSplits, class_names_for
from .files import decode_image

__all__ = ["HF_LAYOUT", "HFImages", "load_hf_disk"]

HF_LAYOUT = (
    "a directory written by datasets.DatasetDict.save_to_disk with splits train and validation "
    "(or test), an image column (image or img) and an integer label column (label or labels)"
)
_IMAGE_COLUMNS = ("image", "img")
_LABEL_COLUMNS = ("label", "labels", "fine_label")
_EVAL_SPLITS = ("validation", "val", "test")


def _fail(path: object, problem: str) -> DatasetError:
    return DatasetError.for_path("hf", path, problem, HF_LAYOUT)


def _column(dataset: Any, candidates: tuple[str, ...], what: str, path: object) -> str:
    found = next((c for c in candidates if c in dataset.column_names), None)
    if found is None:
        raise _fail(
            path,
            f"no {what} column (looked for {', '.join(candidates)}) among {dataset.column_names}",
        )
    return found


class HFImages:
    """One split of a saved ``datasets`` dataset as an image source (images decoded in ``read``)."""

    def __init__(self, dataset: Any, path: object) -> None:
        from datasets import Image as ImageFeature

        image_column = _column(dataset, _IMAGE_COLUMNS, "image", path)
        label_column = _column(dataset, _LABEL_COLUMNS, "label", path)
        labels = np.asarray(dataset[label_column])
        if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
            raise _fail(path, f"column {label_column!r} is not one integer label per sample")
        if labels.size and labels.min() < 0:
            raise _fail(path, f"column {label_column!r} holds negative labels")
        self.labels = labels.astype(np.int64)
        feature = dataset.features[label_column]
        self.class_names = (
            [str(n) for n in feature.names]
            if hasattr(feature, "names")
            else class_names_for(labels)
        )
        # Undecoded bytes: decoding (and its errors) then goes through decode_image like files.
        self.images = dataset.select_columns([image_column]).cast_column(
            image_column, ImageFeature(decode=False)
        )
        self.image_column = image_column
        self.mode = "RGB"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def describe(self, index: int) -> str:
        cell = self.images[int(index)][self.image_column]
        return f"#{index} ({cell.get('path') or 'embedded bytes'})"

    def encoded(self, index: int) -> bytes | str:
        """The image's stored bytes (or its file path when only a path is stored)."""
        cell = self.images[int(index)][self.image_column]
        return cell["bytes"] if cell.get("bytes") is not None else cell["path"]

    def read(self, index: int) -> np.ndarray:
        return decode_image(self.encoded(index), self.mode, self.describe(index))


def load_hf_disk(path: str | os.PathLike[str]) -> DatasetSplits:
    """Open a ``save_to_disk`` directory holding train and validation/test splits."""
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError:
        raise _fail(
            path, "the optional 'datasets' package is not installed (pip install 'visionmoe[hf]')"
        ) from None
    directory = Path(path)
    if not directory.is_dir():
        raise _fail(
            path, "directory does not exist" if not directory.exists() else "not a directory"
        )
    try:
        loaded = load_from_disk(str(directory))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise _fail(path, f"not a saved dataset ({type(exc).__name__}: {exc})") from exc
    if not isinstance(loaded, DatasetDict):
        raise _fail(path, "found a single split; save a DatasetDict with train and validation")
    if "train" not in loaded:
        raise _fail(path, f"no train split among {sorted(loaded)}")
    eval_split = next((s for s in _EVAL_SPLITS if s in loaded), None)
    if eval_split is None:
        raise _fail(path, f"no validation or test split among {sorted(loaded)}")
    train, test = HFImages(loaded["train"], path), HFImages(loaded[eval_split], path)
    if len(test.class_names) > len(train.class_names):
        train.class_names = list(test.class_names)
    test.class_names = list(train.class_names)
    return DatasetSplits(name=directory.resolve().name, train=train, test=test)
