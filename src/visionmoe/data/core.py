"""The dataset interface shared by every loader, its in-memory implementation and errors.

Every split, whatever its storage, is an :class:`ImageSource`: a length, integer ``labels``
(cheap, known up front), ``class_names`` and ``read(i)`` returning one uint8 ``(H, W, C)`` image.
In-memory formats (digits, IDX, CIFAR pickles, npz) are :class:`ImageDataset` arrays, where
``read`` is an index; file formats (folders, tar shards, saved Hugging Face datasets) decode one
file in ``read``, so nothing is decoded before a batch needs it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = [
    "CorruptImageError",
    "DatasetError",
    "DatasetSplits",
    "ImageDataset",
    "ImageSource",
    "Subset",
    "class_names_for",
    "split_indices",
]


class DatasetError(ValueError):
    """A dataset could not be loaded because of what is (or is not) on disk.

    Subclassing ``ValueError`` lets callers that already catch bad-argument errors keep working,
    while a dedicated type lets a CLI print the one-line message instead of a traceback.
    """

    @classmethod
    def for_path(
        cls, kind: str, path: str | os.PathLike[str] | None, problem: str, expected: str
    ) -> DatasetError:
        """Build the canonical message so every loader reports failures the same way.

        Newlines are folded because the message is meant to fit on one terminal line even when
        ``problem`` embeds the text of a lower-level exception.
        """
        problem = " ".join(str(problem).split())
        return cls(f"cannot load {kind} dataset from '{path}': {problem}; expected {expected}")


class CorruptImageError(DatasetError):
    """One sample could not be decoded; the loader skips it (or stops, when strict)."""


@runtime_checkable
class ImageSource(Protocol):
    """One split of an image-classification dataset, read one sample at a time.

    ``labels`` is an int64 array of length ``len(source)``; ``read(i)`` returns image ``i`` as a
    uint8 ``(H, W, C)`` array with C in {1, 3} (sizes may differ between samples) or raises
    :class:`CorruptImageError` naming the file.  Implementations must be picklable, because
    ``torch.utils.data.DataLoader`` worker processes receive a copy.  File-backed sources also
    offer ``encoded(i)`` (the undecoded bytes or path, for transforms that decode only a crop) and
    ``describe(i)`` (the file named in error messages).
    """

    labels: np.ndarray
    class_names: list[str]

    def __len__(self) -> int: ...

    def read(self, index: int) -> np.ndarray: ...


@dataclass
class ImageDataset:
    """One split of an image-classification dataset held in memory.

    ``images`` stays uint8 NHWC (the on-disk layout of every supported format) so a dataset costs
    a quarter of the float32 memory; conversion to model input happens per batch in
    :func:`visionmoe.data.to_model_input`.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]

    def __post_init__(self) -> None:
        # Validate eagerly: a malformed array otherwise surfaces as a confusing shape error deep
        # inside a training step, far from the loader that produced it.
        images = self.images
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(
                "images must be a uint8 numpy array of shape (N, H, W, C), got "
                f"{type(images).__name__} {getattr(images, 'dtype', '?')} "
                f"{getattr(images, 'shape', '?')}"
            )
        if images.shape[3] not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels, got shape {images.shape}")
        labels = np.asarray(self.labels)
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {labels.shape}")
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        # Normalising the dtype here means model code can rely on int64 for cross_entropy.
        self.labels = labels.astype(np.int64, copy=False)
        self.class_names = [str(name) for name in self.class_names]
        if self.labels.size:
            low, high = int(self.labels.min()), int(self.labels.max())
            if low < 0 or high >= len(self.class_names):
                raise ValueError(
                    f"labels must lie in [0, {len(self.class_names)}), got range [{low}, {high}]"
                )

    @property
    def num_classes(self) -> int:
        """Number of classes, including classes that happen to have no samples in this split."""
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image, handy for building a model that matches the data."""
        _, h, w, c = self.images.shape
        return (h, w, c)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def read(self, index: int) -> np.ndarray:
        """Image ``index`` as a (H, W, C) uint8 view (no copy)."""
        return self.images[index]


class Subset:
    """The samples ``indices`` of ``base``, in that order, as an :class:`ImageSource`."""

    def __init__(self, base: ImageSource, indices: np.ndarray) -> None:
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        if self.indices.ndim != 1 or (
            self.indices.size and (self.indices.min() < 0 or self.indices.max() >= len(base))
        ):
            raise ValueError(f"subset indices must be 1-D and lie in [0, {len(base)})")
        self.labels = np.asarray(base.labels)[self.indices]
        self.class_names = list(base.class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def read(self, index: int) -> np.ndarray:
        return self.base.read(int(self.indices[index]))

    def __getattr__(self, name: str):
        # Forward the optional per-sample methods (``encoded``, ``describe``) only where the base
        # has them, so ``hasattr(subset, "encoded")`` answers as the base would.
        if name in ("encoded", "describe"):
            method = getattr(self.base, name)
            return lambda index: method(int(self.indices[index]))
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


@dataclass
class DatasetSplits:
    """A named train/test pair; the name is used for logging and run directories."""

    name: str
    train: ImageSource
    test: ImageSource

    @property
    def num_classes(self) -> int:
        """Both splits share ``class_names``, so the train split is authoritative."""
        return len(self.train.class_names)


def class_names_for(*label_arrays: np.ndarray) -> list[str]:
    """Name classes "0".."K-1" with K = largest label + 1 over all splits.

    Using max+1 rather than the distinct count keeps every label a valid index even when a label
    value never occurs (e.g. EMNIST-letters, whose labels start at 1).
    """
    highest = -1
    for labels in label_arrays:
        if labels.size:
            highest = max(highest, int(labels.max()))
    return [str(i) for i in range(highest + 1)]


def split_indices(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return (train, test) index arrays of a seeded, stratified split.

    Stratification keeps the class balance of small datasets intact, which matters for the tiny
    benchmarks this library is tested on.  scikit-learn refuses to stratify when a class has a
    single sample or when the test split is smaller than the number of classes; we then fall back
    to an unstratified seeded split instead of failing, since a slightly unbalanced split is
    better than no split.  The indices keep scikit-learn's (shuffled) order so results match a
    direct ``train_test_split`` call with the same seed.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    from sklearn.model_selection import train_test_split  # heavy import; only when splitting

    indices = np.arange(labels.shape[0])
    try:
        train, test = train_test_split(
            indices, test_size=test_fraction, stratify=labels, random_state=seed
        )
    except ValueError:
        train, test = train_test_split(indices, test_size=test_fraction, random_state=seed)
    return np.asarray(train), np.asarray(test)
