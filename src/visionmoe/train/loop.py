"""The train step and a short fit loop; logging, eval and checkpoints are hooks.

The batch at step ``s`` is a pure function of ``(seed, s)`` (data order and augmentation), and the
only other randomness (router noise, dropout) comes from the global torch generator, which is
checkpointed. So a run resumed from step ``s`` replays exactly what the uninterrupted run did.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from visionmoe.data import BatchIterator
from visionmoe.train.config import ExperimentConfig
from visionmoe.train.inputs import TensorSplit, TrainStream, augment_for_step
from visionmoe.train.optim import learning_rate, set_learning_rate

__all__ = [
    "Hook",
    "TrainState",
    "augment_for_step",
    "batch_for_step",
    "classification_loss",
    "clip_local",
    "fit",
    "stream_batch_for_step",
    "train_step",
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


class Hook(Protocol):
    def after_step(self, state: TrainState) -> None: ...

    def at_end(self, state: TrainState) -> None: ...


def classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, kind: str, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Softmax cross-entropy, or sigmoid BCE summed over classes (V-MoE upstream).

    E^3 member logits ``(B, M, C)`` are trained as M models: the loss is averaged over B*M
    predictions against the repeated labels.
    """
    logits = logits.float()
    if logits.ndim == 3:
        labels = labels.repeat_interleave(logits.shape[1])
        logits = logits.reshape(-1, logits.shape[-1])
    if kind == "softmax":
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    target = F.one_hot(labels, logits.shape[-1]).float()
    return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / len(labels)


def clip_local(model: nn.Module, max_norm: float | None) -> torch.Tensor:
    """Global-norm gradient clipping in one process; returns the norm before clipping."""
    return torch.nn.utils.clip_grad_norm_(
        model.parameters(), max_norm if max_norm else float("inf")
    )


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    config: ExperimentConfig,
    clip_fn: Callable[[nn.Module, float | None], torch.Tensor] = clip_local,
) -> dict[str, float]:
    """One optimisation step on ``(x, y)``: task loss + summed MoE aux loss.

    ``clip_fn(model, max_norm)`` runs between backward and the update and returns the gradient
    norm; distributed training passes one that first synchronises gradients across ranks.
    """
    model.train()
    logits, aux = model(x, return_aux=True)
    task = classification_loss(logits, y, config.train.loss, config.train.label_smoothing)
    loss = task + aux.loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = clip_fn(model, config.optim.grad_clip)
    optimizer.step()
    metrics = {
        "train/loss": float(loss.detach()),
        "train/task_loss": float(task.detach()),
        "train/aux_loss": float(aux.loss.detach()),
        "train/accuracy": float((_predictions(logits) == y).float().mean()),
        "train/grad_norm": float(grad_norm),
    }
    metrics.update(aux.metrics())
    return metrics


def _predictions(logits: torch.Tensor) -> torch.Tensor:
    """Class predictions; E^3 member logits vote through their mean probability."""
    if logits.ndim == 3:
        return torch.softmax(logits.detach().float(), -1).mean(1).argmax(-1)
    return logits.argmax(-1)


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


def fit(
    state: TrainState,
    data: TensorSplit | TrainStream,
    hooks: Sequence[Hook],
    batch_fn: Callable = batch_for_step,
    step_fn: Callable = train_step,
) -> TrainState:
    """Run steps ``state.step .. train.steps - 1``, calling every hook after each step.

    ``batch_fn(data, batches, step, config) -> (inputs, targets)`` and
    ``step_fn(model, optimizer, inputs, targets, config) -> metrics`` default to image
    classification; other tasks (LIMoE's image-text pairs) pass their own.  A
    :class:`TrainStream` goes with ``batch_fn=stream_batch_for_step``.
    """
    config = state.config
    batches = BatchIterator(len(data), config.train.batch_size, config.train.seed)
    try:
        while state.step < config.train.steps and not state.stop:
            lr = learning_rate(state.step, config.train.steps, config.optim.lr, config.schedule)
            set_learning_rate(state.optimizer, lr)
            inputs, targets = batch_fn(data, batches, state.step, config)
            start = time.perf_counter()
            state.metrics = step_fn(state.model, state.optimizer, inputs, targets, config)
            elapsed = time.perf_counter() - start
            state.metrics["train/lr"] = lr
            state.metrics["train/images_per_s"] = len(inputs) / elapsed if elapsed > 0 else 0.0
            if isinstance(data, TrainStream):
                state.metrics["data/skipped_images"] = float(data.skipped)
            state.step += 1
            for hook in hooks:
                hook.after_step(state)
    finally:
        if isinstance(data, TrainStream):
            data.close()  # stop the loader's workers before evaluation starts its own
    for hook in hooks:
        hook.at_end(state)
    return state
