"""Stateless, seeded batch scheduling: global batches by step, rank shards, evaluation order."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = ["BatchIterator", "eval_indices", "rank_slice"]


class BatchIterator:
    """Yields index batches whose content depends only on ``(seed, step)``.

    Making the schedule a pure function of the global step (rather than of an iterator's hidden
    state) means a run restored from a checkpoint at step ``s`` sees exactly the batches the
    uninterrupted run would have seen, with nothing extra to save.  Each epoch uses the
    permutation ``np.random.default_rng((seed, epoch)).permutation(N)``, so every index appears
    once per epoch.
    """

    def __init__(
        self,
        dataset_len: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        if dataset_len <= 0:
            raise ValueError(f"dataset_len must be positive, got {dataset_len}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative (numpy SeedSequence), got {seed}")
        if drop_last and batch_size > dataset_len:
            raise ValueError(
                f"batch_size {batch_size} exceeds dataset_len {dataset_len} with drop_last=True, "
                "so an epoch would contain no batches"
            )
        self.dataset_len = int(dataset_len)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        full, rest = divmod(self.dataset_len, self.batch_size)
        self.steps_per_epoch: int = full if drop_last or rest == 0 else full + 1
        # Consecutive steps share an epoch; caching its permutation avoids O(N) work per step.
        self._cached_epoch: int | None = None
        self._cached_order: np.ndarray | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._cached_epoch != epoch or self._cached_order is None:
            if self.shuffle:
                order = np.random.default_rng((self.seed, epoch)).permutation(self.dataset_len)
            else:
                order = np.arange(self.dataset_len)
            order.flags.writeable = False  # slices are handed out; keep the cache intact
            self._cached_epoch, self._cached_order = epoch, order
        return self._cached_order

    def epoch_of(self, step: int) -> int:
        """Epoch that global ``step`` falls in, for logging and epoch-based schedules."""
        return step // self.steps_per_epoch

    def indices_for_step(self, step: int) -> np.ndarray:
        """Dataset indices (int64) of the batch used at global ``step`` (0-based)."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        epoch, position = divmod(int(step), self.steps_per_epoch)
        start = position * self.batch_size
        return self._order(epoch)[start : start + self.batch_size].astype(np.int64)

    def shard_for_step(self, step: int, rank: int, world_size: int) -> tuple[np.ndarray, slice]:
        """This rank's share of the batch at ``step``: (dataset indices, positions in the batch).

        Rank ``r`` of ``W`` gets the ``r``-th of ``W`` equal contiguous blocks of the global
        batch, so the ranks' shares concatenated in rank order are the global batch, whatever
        ``W`` is: a run resumed on a different number of ranks sees the same global batches.
        """
        positions = rank_slice(self.batch_size, rank, world_size)
        return self.indices_for_step(step)[positions], positions

    def batches(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[np.ndarray]:
        """Iterate batch indices from ``start_step``; endless unless ``num_steps`` is given."""
        step = start_step
        while num_steps is None or step < start_step + num_steps:
            yield self.indices_for_step(step)
            step += 1

    def __len__(self) -> int:
        return self.steps_per_epoch


def rank_slice(batch_size: int, rank: int, world_size: int) -> slice:
    """Positions ``[r * B / W, (r + 1) * B / W)`` of a global batch of ``B`` that rank ``r`` reads.

    ``B`` must be divisible by ``W`` so every rank runs the same local batch size.
    """
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size), got rank {rank} of {world_size}")
    if batch_size % world_size:
        raise ValueError(
            f"the global batch size {batch_size} must be divisible by the number of ranks "
            f"{world_size}"
        )
    share = batch_size // world_size
    return slice(rank * share, (rank + 1) * share)


def eval_indices(dataset_len: int, seed: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """Dataset indices that ``rank`` evaluates: its block of a fixed seeded permutation.

    The permutation ``default_rng((seed, 2**31)).permutation(N)`` (a stream no training epoch
    uses) mixes classes, so a partial evaluation is not biased towards the first classes; the
    ranks take ``W`` contiguous blocks whose sizes differ by at most one, and together they cover
    every index exactly once.
    """
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size), got rank {rank} of {world_size}")
    order = np.random.default_rng((seed, 2**31)).permutation(dataset_len)
    bounds = (np.arange(world_size + 1) * dataset_len) // world_size
    return order[bounds[rank] : bounds[rank + 1]].astype(np.int64)
