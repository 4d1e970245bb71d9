"""Name-based dispatch so configs and the CLI can select a dataset with a string."""

from __future__ import annotations

import os
from typing import Any

from .cifar import CIFAR10_LAYOUT, CIFAR100_LAYOUT, load_cifar
from .core import DatasetError, DatasetSplits
from .digits import load_digits
from .folder import FOLDER_LAYOUT, load_image_folder
from .hfdisk import HF_LAYOUT, load_hf_disk
from .idx import IDX_LAYOUT, load_idx
from .npz import NPZ_LAYOUT, load_npz
from .shards import SHARDS_LAYOUT, load_tar_shards

__all__ = ["DATASET_KINDS", "load_dataset"]

DATASET_KINDS: tuple[str, ...] = (
    "digits",
    "folder",
    "idx",
    "cifar10",
    "cifar100",
    "npz",
    "tar",
    "hf",
)

_LAYOUTS = {
    "folder": FOLDER_LAYOUT,
    "idx": IDX_LAYOUT,
    "cifar10": CIFAR10_LAYOUT,
    "cifar100": CIFAR100_LAYOUT,
    "npz": NPZ_LAYOUT,
    "tar": SHARDS_LAYOUT,
    "hf": HF_LAYOUT,
}


def load_dataset(kind: str, path: str | os.PathLike[str] | None = None, **kw: Any) -> DatasetSplits:
    """Load dataset ``kind`` from ``path``, forwarding ``kw`` to the specific loader.

    ``digits`` is bundled with scikit-learn and takes no path; giving one is rejected because it
    almost certainly means the wrong kind was chosen.  Every other kind requires a path.
    """
    if kind not in DATASET_KINDS:
        raise ValueError(
            f"unknown dataset kind {kind!r}; expected one of {', '.join(DATASET_KINDS)}"
        )
    has_path = path is not None and str(path) != ""
    if kind == "digits":
        if has_path:
            raise ValueError(
                f"the digits dataset ships with scikit-learn and takes no path (got '{path}')"
            )
        return load_digits(**kw)
    if not has_path:
        raise DatasetError.for_path(kind, path, "no path given", _LAYOUTS[kind])
    assert path is not None
    if kind == "folder":
        return load_image_folder(path, **kw)
    if kind == "idx":
        return load_idx(path, **kw)
    if kind in ("cifar10", "cifar100"):
        return load_cifar(path, variant=kind, **kw)
    if kind == "tar":
        return load_tar_shards(path, **kw)
    if kind == "hf":
        return load_hf_disk(path, **kw)
    return load_npz(path, **kw)
