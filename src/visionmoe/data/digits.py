"""scikit-learn's bundled 8x8 digits, the one dataset that needs no files and no network."""

from __future__ import annotations

import numpy as np

from .core import DatasetSplits, ImageDataset, split_indices

__all__ = ["load_digits"]


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> DatasetSplits:
    """Load the 1,797 UCI digits as (N, 8, 8, 1) uint8 with a fixed stratified split.

    The raw pixels are 0..16; they are rescaled to 0..255 so this dataset goes through exactly the
    same ``to_model_input`` normalisation as every real image dataset.  The split is seeded and
    stratified so quick experiments are comparable across runs and machines.
    """
    from sklearn.datasets import load_digits as _sk_load_digits  # ships with sklearn, no download

    bunch = _sk_load_digits()
    images = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0))
    images = np.clip(images, 0, 255).astype(np.uint8)[..., None]
    labels = np.asarray(bunch.target, dtype=np.int64)
    class_names = [str(i) for i in range(10)]
    train_idx, test_idx = split_indices(labels, test_fraction, seed)
    return DatasetSplits(
        name="digits",
        train=ImageDataset(images[train_idx], labels[train_idx], class_names),
        test=ImageDataset(images[test_idx], labels[test_idx], list(class_names)),
    )
