"""Step metrics kept on the device between log steps, and what the logs say about speed.

The step metrics are 0-dim tensors on the model's device. :class:`MetricsWindow` sums them there
(tensor adds queue kernels and wait for nothing) and reads them once per log step, as the mean
over the steps since the previous read, in one copy. With the read it adds:

- ``train/images_per_s``: images of the window / wall time from the window's first step to the
  read (the read waits for the device, so queued work is counted);
- ``train/data_wait_s``: mean seconds per step spent producing the batch and moving it to the
  device, and ``train/data_wait_frac`` that time as a fraction of the window;
- ``train/peak_memory_mb``: peak allocated CUDA memory, or the process's peak RSS on CPU.

A run resumed from a checkpoint starts a fresh window, so its first logged means equal the
uninterrupted run's when checkpoints fall on log steps (``checkpoint_every`` a multiple of
``log_every``, as in every recipe).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor

from visionmoe.runtime import peak_memory_mb
from visionmoe.train.step import to_floats


class MetricsWindow:
    """Device-side sums of the metrics of the steps since the last :meth:`read`."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, Tensor | float] = {}
        self.steps, self.images, self.data_seconds = 0, 0, 0.0
        self.started: float | None = None

    def begin_step(self) -> None:
        """Mark the start of a step (the window's clock starts at its first step)."""
        if self.started is None:
            self.started = time.perf_counter()

    def add(self, metrics: dict[str, Tensor | float], images: int, data_seconds: float) -> None:
        """Add one step's metrics (tensors stay on the device) and its image count / data time."""
        for key, value in metrics.items():
            if isinstance(value, Tensor):
                value = value.detach().float().to(self.device, non_blocking=True)
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.steps += 1
        self.images += images
        self.data_seconds += data_seconds

    def read(self, reduce: Callable[[dict], dict] | None = None) -> dict[str, float]:
        """Means over the window as floats (the one host sync), speed and memory; then reset.

        ``reduce`` maps the dict of means before it is read back (distributed training passes
        an all-reduce over ranks, so ranks exchange metrics once per log step, not every step).
        """
        steps = max(self.steps, 1)
        means = {key: value / steps for key, value in self.sums.items()}
        out = to_floats(reduce(means) if reduce is not None else means)
        elapsed = time.perf_counter() - (self.started or time.perf_counter())
        out["train/images_per_s"] = self.images / elapsed if elapsed > 0 else 0.0
        out["train/data_wait_s"] = self.data_seconds / steps
        out["train/data_wait_frac"] = self.data_seconds / elapsed if elapsed > 0 else 0.0
        out["train/peak_memory_mb"] = peak_memory_mb(self.device)
        self.reset()
        return out
