"""Stateless, seeded batch scheduling for in-memory datasets."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = ["BatchIterator"]


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

    def batches(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[np.ndarray]:
        """Iterate batch indices from ``start_step``; endless unless ``num_steps`` is given."""
        step = start_step
        while num_steps is None or step < start_step + num_steps:
            yield self.indices_for_step(step)
            step += 1

    def __len__(self) -> int:
        return self.steps_per_epoch
