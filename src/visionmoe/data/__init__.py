"""Image-classification datasets for Vision-MoE models.

Every loader returns a :class:`DatasetSplits` of two :class:`ImageSource` splits read from local
files only (nothing here downloads): in-memory uint8 arrays (:class:`ImageDataset`) or files
decoded one sample at a time (:class:`ImageFiles`).  :class:`StepBatches` / :class:`EvalBatches`
read one rank's share of a batch inside DataLoader workers (:func:`make_loader`), scheduled by the
resumable :class:`BatchIterator`; :func:`to_model_input` and :func:`augment` finish the batch on
the device.
"""

from .batching import BatchIterator, eval_indices, rank_slice
from .cifar import load_cifar
from .core import (
    CorruptImageError,
    DatasetError,
    DatasetSplits,
    ImageDataset,
    ImageSource,
    Subset,
)
from .digits import load_digits
from .files import ImageFiles, decode_image
from .folder import load_image_folder
from .idx import load_idx
from .loader import EvalBatches, SampleTransform, StepBatches, make_loader
from .npz import FASHION_MNIST_CLASS_NAMES, load_npz
from .registry import DATASET_KINDS, load_dataset
from .transforms import augment, to_model_input

__all__ = [
    "DATASET_KINDS",
    "FASHION_MNIST_CLASS_NAMES",
    "BatchIterator",
    "CorruptImageError",
    "DatasetError",
    "DatasetSplits",
    "EvalBatches",
    "ImageDataset",
    "ImageFiles",
    "ImageSource",
    "SampleTransform",
    "StepBatches",
    "Subset",
    "augment",
    "decode_image",
    "eval_indices",
    "load_cifar",
    "load_dataset",
    "load_digits",
    "load_idx",
    "load_image_folder",
    "load_npz",
    "make_loader",
    "rank_slice",
    "to_model_input",
]
