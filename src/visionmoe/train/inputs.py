"""Turning a dataset config into model-ready tensors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from visionmoe.data import DatasetSplits, ImageDataset, load_dataset, to_model_input
from visionmoe.models.config import ViTConfig
from visionmoe.train.config import DataConfig


@dataclass
class TensorSplit:
    """Model input ``x (N, C, H, W)`` float32 in [-1, 1] and labels ``y (N,)`` int64."""

    x: torch.Tensor
    y: torch.Tensor
    images: np.ndarray  # the uint8 originals, for reports

    def __len__(self) -> int:
        return len(self.y)


def load_splits(data: DataConfig) -> DatasetSplits:
    """Load the configured dataset; every kind but ``digits`` needs ``data.path``."""
    if data.kind != "digits" and data.path is None:
        raise ValueError(
            f"data.kind={data.kind!r} needs a dataset path: pass --data PATH "
            f"(or --set data.path=PATH)"
        )
    kwargs = {"test_fraction": data.test_fraction} if data.kind == "digits" else {}
    splits = load_dataset(data.kind, data.path, **kwargs)
    if data.max_train_examples is not None and len(splits.train) > data.max_train_examples:
        keep = np.arange(data.max_train_examples)
        splits = DatasetSplits(
            name=splits.name,
            train=ImageDataset(
                splits.train.images[keep], splits.train.labels[keep], splits.train.class_names
            ),
            test=splits.test,
        )
    return splits


def to_tensors(dataset: ImageDataset, model: ViTConfig, chunk: int = 4096) -> TensorSplit:
    """Resize and scale once up front: per-step work is then just indexing."""
    parts = [
        to_model_input(dataset.images[i : i + chunk], model.image_size, model.in_chans)
        for i in range(0, len(dataset), chunk)
    ]
    return TensorSplit(
        torch.cat(parts), torch.as_tensor(dataset.labels, dtype=torch.long), dataset.images
    )
