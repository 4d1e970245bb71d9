"""Image-classification datasets for Vision-MoE models.

Every loader returns a :class:`DatasetSplits` of uint8 NHWC arrays read from local files only;
nothing here downloads.  Batches are turned into model input with :func:`to_model_input` and
optionally :func:`augment`, and scheduled by the resumable :class:`BatchIterator`.
"""

from .batching import BatchIterator
from .cifar import load_cifar
from .core import DatasetError, DatasetSplits, ImageDataset
from .digits import load_digits
from .folder import load_image_folder
from .idx import load_idx
from .npz import FASHION_MNIST_CLASS_NAMES, load_npz
from .registry import DATASET_KINDS, load_dataset
from .transforms import augment, to_model_input

__all__ = [
    "DATASET_KINDS",
    "FASHION_MNIST_CLASS_NAMES",
    "BatchIterator",
    "DatasetError",
    "DatasetSplits",
    "ImageDataset",
    "augment",
    "load_cifar",
    "load_dataset",
    "load_digits",
    "load_idx",
    "load_image_folder",
    "load_npz",
    "to_model_input",
]
