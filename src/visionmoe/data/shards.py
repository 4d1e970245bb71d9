"""WebDataset-style ``.tar`` shards, read by random access into an index of member offsets.

A sample is the group of tar members sharing a key (the member path up to the first dot of its
file name, as in WebDataset): one image (``.jpg``, ``.jpeg``, ``.png``, ``.webp``, ``.bmp``) and
its class index as text in ``.cls``.  Opening a split reads only the tar headers (and the few
bytes of each ``.cls``) with Python's ``tarfile``; an image is read with one seek when its batch
needs it, so any sample of any shard can be fetched directly, as step-indexed sampling requires.
Shards must be uncompressed (compressed tars cannot be seeked into).
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np

from .core import DatasetError, DatasetSplits, class_names_for
from .files import decode_image

__all__ = ["SHARDS_LAYOUT", "TarShards", "load_tar_shards"]

SHARDS_LAYOUT = (
    "a directory holding train/ and val/ (or test/) folders of uncompressed .tar shards, or "
    "shards named train-*.tar and val-*.tar (or test-*.tar); each sample is a KEY.jpg (or "
    ".jpeg/.png/.webp/.bmp) image with its class index as text in KEY.cls; class names may be "
    "given one per line in classes.txt"
)
_IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp")
_EVAL_SPLITS = ("val", "test")


def _fail(path: object, problem: str) -> DatasetError:
    return DatasetError.for_path("tar", path, problem, SHARDS_LAYOUT)


def _split_key(name: str) -> tuple[str, str]:
    """``dir/abc.def.jpg`` -> (``dir/abc``, ``def.jpg``): WebDataset's key / extension rule."""
    head, _, base = name.rpartition("/")
    stem, dot, suffix = base.partition(".")
    return (f"{head}/{stem}" if head else stem), (suffix.lower() if dot else "")


def _index_shard(shard: Path, path: object) -> tuple[list[int], list[int], list[int]]:
    """(image offsets, image sizes, labels) of every sample of one shard, in tar order."""
    images: dict[str, tuple[int, int]] = {}
    labels: dict[str, int] = {}
    order: list[str] = []
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, suffix = _split_key(member.name)
                if key not in images and key not in labels:
                    order.append(key)
                last = suffix.rpartition(".")[2]  # "seg.png" is an image too
                if last in _IMAGE_SUFFIXES:
                    images[key] = (member.offset_data, member.size)
                elif suffix == "cls":
                    handle = tar.extractfile(member)
                    text = handle.read().decode("utf-8", "replace").strip() if handle else ""
                    try:
                        labels[key] = int(text)
                    except ValueError:
                        raise _fail(
                            path, f"{shard}: {member.name} holds {text[:20]!r}, not a class index"
                        ) from None
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise _fail(path, f"cannot read shard {shard} ({type(exc).__name__}: {exc})") from exc
    offsets, sizes, out_labels = [], [], []
    for key in order:
        if key not in images or key not in labels:
            missing = "image" if key not in images else ".cls label"
            raise _fail(path, f"sample {key!r} in {shard} has no {missing}")
        if labels[key] < 0:
            raise _fail(path, f"sample {key!r} in {shard} has a negative class index")
        offsets.append(images[key][0])
        sizes.append(images[key][1])
        out_labels.append(labels[key])
    return offsets, sizes, out_labels


class TarShards:
    """A split stored as ``.tar`` shards: an index of (shard, offset, size, label) per sample.

    Memory is a few dozen bytes per sample whatever the image sizes; ``read`` seeks to the
    image's bytes and decodes them (to ``mode``, RGB by default).
    """

    def __init__(self, shards: list[Path], path: object) -> None:
        self.shards = [str(s) for s in shards]
        shard_ids, offsets, sizes, labels = [], [], [], []
        for i, shard in enumerate(shards):
            o, s, y = _index_shard(shard, path)
            shard_ids.extend([i] * len(o))
            offsets.extend(o)
            sizes.extend(s)
            labels.extend(y)
        if not labels:
            raise _fail(path, f"no samples found in {', '.join(self.shards)}")
        self.shard_ids = np.asarray(shard_ids, dtype=np.int32)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = [str(i) for i in range(int(self.labels.max()) + 1)]
        self.mode = "RGB"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def describe(self, index: int) -> str:
        return f"#{index} of {self.shards[int(self.shard_ids[index])]}"

    def encoded(self, index: int) -> bytes:
        """The image's encoded bytes, read with one seek into its shard."""
        with open(self.shards[int(self.shard_ids[index])], "rb") as handle:
            handle.seek(int(self.offsets[index]))
            return handle.read(int(self.sizes[index]))

    def read(self, index: int) -> np.ndarray:
        return decode_image(self.encoded(index), self.mode, self.describe(index))


def _shards_in(directory: Path, split: str) -> list[Path]:
    folder = directory / split
    if folder.is_dir():
        return sorted(folder.glob("*.tar"))
    return sorted(directory.glob(f"{split}-*.tar")) + sorted(directory.glob(f"{split}_*.tar"))


def load_tar_shards(path: str | os.PathLike[str]) -> DatasetSplits:
    """Index the train and val (or test) shards under ``path``; see :data:`SHARDS_LAYOUT`."""
    directory = Path(path)
    if not directory.is_dir():
        raise _fail(
            path, "directory does not exist" if not directory.exists() else "not a directory"
        )
    train = _shards_in(directory, "train")
    if not train:
        raise _fail(
            path, f"no train shards ({directory / 'train'}/*.tar or train-*.tar, uncompressed)"
        )
    evaluation = next((s for s in (_shards_in(directory, n) for n in _EVAL_SPLITS) if s), [])
    if not evaluation:
        raise _fail(path, "no val or test shards found next to the train shards")
    splits = TarShards(train, path), TarShards(evaluation, path)
    names = class_names_for(*(split.labels for split in splits))
    names_file = directory / "classes.txt"
    if names_file.is_file():
        given = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        if len(given) < len(names):
            raise _fail(
                path, f"{names_file} names {len(given)} classes but labels go to {len(names) - 1}"
            )
        names = given
    for split in splits:
        split.class_names = list(names)
    return DatasetSplits(name=directory.resolve().name, train=splits[0], test=splits[1])
