"""Batches read by ``torch.utils.data.DataLoader`` workers: one step or eval batch per item.

Training: item ``s`` of :class:`StepBatches` is this rank's share of the global batch at step
``s`` (:meth:`BatchIterator.shard_for_step`), so only that share is read and decoded, and the
content depends on ``(seed, s, rank, world_size)`` alone.  Evaluation: item ``b`` of
:class:`EvalBatches` is the ``b``-th batch of this rank's block of a fixed seeded permutation.

Each sample goes through ``transform(image_HWC_uint8, generator) -> image_HWC_uint8`` (numpy array
or tensor) with a ``torch.Generator`` seeded by :func:`sample_seed` of ``(seed, step, position)``
(``position`` in the global batch), so augmentation too is the same whichever rank reads the
sample.  A :class:`visionmoe.data.ops.Transform` receives the encoded sample instead (file path or
bytes, from ``source.encoded(i)`` where the source has it), so it can decode only the crop.
Batches stay uint8 (pinned when asked) and are normalised on the device
(:func:`visionmoe.data.to_model_input`).

A sample that fails to decode is left out of its batch and reported in ``batch["skipped"]``;
with ``strict=True`` the batch comes back with ``batch["error"]`` naming the file instead.
Errors travel as data rather than exceptions so the message stays one line (a worker's
exception would be re-raised with its traceback folded into the message).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .batching import BatchIterator, eval_indices
from .core import CorruptImageError, DatasetError, ImageSource
from .ops.pipeline import Transform

__all__ = [
    "EVAL_STREAM",
    "EvalBatches",
    "SampleTransform",
    "StepBatches",
    "make_loader",
    "read_batch",
    "sample_seed",
]

SampleTransform = Callable[[Any, torch.Generator], "np.ndarray | torch.Tensor"]
EVAL_STREAM = 2**31  # the rng "step" for evaluation samples; no training step reaches it


def sample_seed(key: tuple[int, ...]) -> int:
    """64-bit seed of one sample's generator: ``SeedSequence(key).generate_state(1, uint64)[0]``.

    Hashing the whole key through numpy's ``SeedSequence`` keeps nearby keys (consecutive steps
    or positions) statistically independent, unlike adding them into one integer.
    """
    return int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0])


def _describe(source: ImageSource, index: int) -> str:
    describe = getattr(source, "describe", None)
    return describe(index) if describe is not None else f"sample {index}"


def _load(source: ImageSource, index: int, key: tuple[int, ...], transform) -> Any:
    """Read (and transform) one sample; decoding failures become :class:`CorruptImageError`."""
    if transform is None:
        return source.read(index)
    generator = torch.Generator().manual_seed(sample_seed(key))
    if not (isinstance(transform, Transform) and hasattr(source, "encoded")):
        return transform(source.read(index), generator)
    from PIL import Image

    try:
        return transform(source.encoded(index), generator)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        problem = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise CorruptImageError(
            f"cannot decode image {_describe(source, index)} ({problem})"
        ) from exc


def read_batch(
    source: ImageSource,
    indices: np.ndarray,
    positions: np.ndarray,
    rng_key: tuple[int, int],
    transform: SampleTransform | None,
    strict: bool,
) -> dict[str, Any]:
    """Read, transform and stack ``indices``: ``images (n, H, W, C)`` uint8, ``labels (n,)``.

    ``positions`` label each sample for the random streams (``rng_key + (position,)``) and come
    back for the kept samples, so batch-level augmentation can draw for the same positions.
    """
    images, kept, skipped = [], [], []
    for index, position in zip(indices.tolist(), positions.tolist(), strict=True):
        try:
            image = _load(source, index, (*rng_key, position), transform)
        except CorruptImageError as err:
            if strict:
                return {"error": f"{err} (strict data loading; set data.strict=false to skip)"}
            skipped.append(str(err))
            continue
        images.append(np.asarray(image))
        kept.append((index, position))
    if not images:
        return {"error": f"every image of a batch failed to decode, e.g. {skipped[0]}"}
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        return {
            "error": f"images of one batch have different shapes {sorted(shapes)[:3]}; "
            "give a per-sample transform that resizes them to one size"
        }
    picked = np.asarray([index for index, _ in kept], dtype=np.int64)
    return {
        "images": torch.from_numpy(np.stack(images)),
        "labels": torch.from_numpy(np.asarray(source.labels)[picked].astype(np.int64)),
        "positions": torch.as_tensor([position for _, position in kept], dtype=torch.long),
        "skipped": skipped,
    }


class StepBatches(Dataset):
    """Item ``step``: rank ``rank``'s share of the global training batch at ``step``."""

    def __init__(
        self,
        source: ImageSource,
        batch_size: int,
        seed: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        transform: SampleTransform | None = None,
        strict: bool = False,
    ) -> None:
        self.source, self.transform, self.strict = source, transform, strict
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.sampler = BatchIterator(len(source), batch_size, seed)
        self.sampler.shard_for_step(0, rank, world_size)  # validates rank and divisibility now

    def __getitem__(self, step: int) -> dict[str, Any]:
        indices, where = self.sampler.shard_for_step(step, self.rank, self.world_size)
        positions = np.arange(where.start, where.stop)
        batch = read_batch(
            self.source, indices, positions, (self.seed, step), self.transform, self.strict
        )
        batch["step"] = step
        return batch


class EvalBatches(Dataset):
    """Item ``b``: the ``b``-th batch of this rank's block of the seeded evaluation order."""

    def __init__(
        self,
        source: ImageSource,
        batch_size: int,
        seed: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        transform: SampleTransform | None = None,
        strict: bool = False,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.source, self.transform, self.strict = source, transform, strict
        self.batch_size, self.seed = batch_size, seed
        self.indices = eval_indices(len(source), seed, rank, world_size)

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __getitem__(self, item: int) -> dict[str, Any]:
        indices = self.indices[item * self.batch_size : (item + 1) * self.batch_size]
        # Keyed by dataset index, so an eval transform draws the same whatever the rank layout.
        batch = read_batch(
            self.source, indices, indices, (self.seed, EVAL_STREAM), self.transform, self.strict
        )
        batch["step"] = item
        return batch


def _worker_init(_: int) -> None:
    # Decoding is per-sample Python + Pillow; intra-op threads in every worker only oversubscribe.
    torch.set_num_threads(1)


def make_loader(
    dataset: Dataset,
    items: range,
    *,
    num_workers: int = 0,
    pin_memory: bool = False,
    prefetch: int = 2,
    timeout_s: float = 0.0,
) -> Iterator[dict[str, Any]]:
    """Iterate ``dataset[i]`` for ``i`` in ``items``, in order, read by ``num_workers`` processes.

    ``prefetch`` batches per worker are read ahead; ``pin_memory`` page-locks each batch for a
    fast asynchronous copy to a GPU; ``timeout_s > 0`` turns a worker that stops answering into
    an error instead of a hang.  A batch whose reading failed raises :class:`DatasetError`.
    """
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if prefetch <= 0:
        raise ValueError(f"prefetch must be >= 1, got {prefetch}")
    loader = DataLoader(
        dataset,
        batch_size=None,
        sampler=items,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch if num_workers else None,
        timeout=timeout_s if num_workers else 0.0,
        worker_init_fn=_worker_init if num_workers else None,
        # Its own generator: the default one would draw worker seeds from the global torch
        # stream, shifting router noise and dropout whenever a loader starts.
        generator=torch.Generator().manual_seed(0),
    )
    for batch in loader:
        if "error" in batch:
            raise DatasetError(batch["error"])
        yield batch
