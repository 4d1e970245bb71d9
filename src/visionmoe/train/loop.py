"""A short fit loop around the train step; logging, eval and checkpoints are hooks.

The batch at step ``s`` is a pure function of ``(seed, s)`` (data order and augmentation), and the
only other randomness (router noise, dropout) comes from the global torch generators (CPU and
CUDA), which are checkpointed. So a run resumed from step ``s`` replays exactly what the
uninterrupted run did.

The step (:mod:`visionmoe.train.step`) leaves its metrics on the device; the loop sums them there
and reads them only on log steps (``train.log_every``), so on a GPU the host never waits for the
device between log steps. Hooks see ``state.metrics`` as of the latest log step (plus eval
results) and ``state.log_step`` tells whether this step just refreshed them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from visionmoe.data import BatchIterator
from visionmoe.train.config import ExperimentConfig
from visionmoe.train.features import to_device
from visionmoe.train.inputs import TensorSplit, TrainStream, augment_for_step
from visionmoe.train.metrics import MetricsWindow
from visionmoe.train.optim import learning_rate, set_learning_rate
from visionmoe.train.step import classification_loss, clip_local, train_step, train_step_device

__all__ = [
    "Hook",
    "TrainState",
    "augment_for_step",
    "batch_for_step",
    "classification_loss",
    "clip_local",
    "fit",
    "is_log_step",
    "stream_batch_for_step",
    "train_step",
    "train_step_device",
]


@dataclass
class TrainState:
    """What hooks see after every step."""

    config: ExperimentConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: int = 0  # steps completed
    metrics: dict[str, float] = field(default_factory=dict)
    images_seen_time: float = 0.0
    stop: bool = False
    log_step: bool = False  # whether ``metrics`` were refreshed at this step


class Hook(Protocol):
    def after_step(self, state: TrainState) -> None: ...

    def at_end(self, state: TrainState) -> None: ...


def batch_for_step(
    data: TensorSplit, batches: BatchIterator, step: int, config: ExperimentConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch at ``step`` from a split held in memory as float tensors."""
    idx = torch.from_numpy(batches.indices_for_step(step).astype("int64"))
    x, y = data.x.index_select(0, idx), data.y.index_select(0, idx)
    return augment_for_step(x, step, config), y


def stream_batch_for_step(
    data: TrainStream, batches: BatchIterator, step: int, config: ExperimentConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch at ``step`` streamed by a :class:`TrainStream` (``batches`` is unused: the
    stream's own sampler gives the same indices)."""
    x, y, _ = data.batch(step)
    return x, y


def is_log_step(step: int, config: ExperimentConfig) -> bool:
    """Whether ``step`` (steps completed) is logged: every ``log_every`` steps and the last."""
    return step % config.train.log_every == 0 or step == config.train.steps


def fit(
    state: TrainState,
    data: TensorSplit | TrainStream,
    hooks: Sequence[Hook],
    batch_fn: Callable = batch_for_step,
    step_fn: Callable = train_step_device,
) -> TrainState:
    """Run steps ``state.step .. train.steps - 1``, calling every hook after each step.

    ``batch_fn(data, batches, step, config) -> (inputs, targets)`` and
    ``step_fn(model, optimizer, inputs, targets, config) -> metrics`` (0-dim device tensors or
    floats) default to image classification; other tasks (LIMoE's image-text pairs) pass their
    own. A :class:`TrainStream` goes with ``batch_fn=stream_batch_for_step``. Batches not yet on
    the model's device are moved there.
    """
    config = state.config
    device = next(state.model.parameters()).device
    batches = BatchIterator(len(data), config.train.batch_size, config.train.seed)
    window = MetricsWindow(device)
    try:
        while state.step < config.train.steps and not state.stop:
            window.begin_step()
            lr = learning_rate(state.step, config.train.steps, config.optim.lr, config.schedule)
            set_learning_rate(state.optimizer, lr)
            waited = time.perf_counter()
            inputs, targets = batch_fn(data, batches, state.step, config)
            inputs, targets = to_device(inputs, device), to_device(targets, device)
            waited = time.perf_counter() - waited
            metrics = step_fn(state.model, state.optimizer, inputs, targets, config)
            window.add(metrics, len(inputs), waited)
            state.step += 1
            state.log_step = is_log_step(state.step, config)
            if state.log_step:
                state.metrics = {**window.read(), "train/lr": lr}
                if isinstance(data, TrainStream):
                    state.metrics["data/skipped_images"] = float(data.skipped)
            for hook in hooks:
                hook.after_step(state)
    finally:
        if isinstance(data, TrainStream):
            data.close()  # stop the loader's workers before evaluation starts its own
    for hook in hooks:
        hook.at_end(state)
    return state
