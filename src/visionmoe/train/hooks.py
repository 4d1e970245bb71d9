"""Hooks for the fit loop: metrics log + progress bar, periodic eval, checkpoints."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from visionmoe.eval.classify import evaluate, evaluate_batches
from visionmoe.train.checkpoint import save_checkpoint
from visionmoe.train.inputs import TensorSplit
from visionmoe.train.loop import TrainState


class MetricsLog:
    """Appends one JSON line per logged step to ``metrics.jsonl``; shows a progress bar.

    With ``tensorboard=True`` every logged number also goes to TensorBoard event files in
    ``<run>/tensorboard`` (``pip install tensorboard``); events after ``start`` from an earlier,
    interrupted session are discarded there, as the JSON log is truncated.
    """

    def __init__(
        self,
        run_dir: Path,
        every: int,
        total: int,
        start: int,
        progress: bool = True,
        tensorboard: bool = False,
    ):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.every = every
        self.bar = None
        self.writer = None
        if tensorboard:
            self.writer = open_tensorboard(Path(run_dir) / "tensorboard", start)
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self.writer is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)

    def after_step(self, state: TrainState) -> None:
        if self.bar is not None:
            self.bar.update(1)
        if not (state.step % self.every == 0 or state.step == state.config.train.steps):
            return
        m = state.metrics
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{m['train/loss']:.3f}",
                acc=f"{m['train/accuracy']:.3f}",
                img_s=f"{m['train/images_per_s']:.0f}",
                refresh=False,
            )
        self.write({"step": state.step, **m})

    def at_end(self, state: TrainState) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def open_tensorboard(directory: Path, start: int):
    """A ``SummaryWriter`` for ``directory`` that drops events at steps > ``start``."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError(
            "train.tensorboard=true needs the tensorboard package: pip install tensorboard "
            "(or pip install 'visionmoe[tensorboard]')"
        ) from None
    return SummaryWriter(str(directory), purge_step=start + 1 if start else None)


EvalBatchesFn = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


class Evaluate:
    """Evaluates on the test split every ``every`` steps and at the end.

    ``data`` is the split in memory, or a function returning a fresh iterable of model-ready
    ``(x, y)`` batches (streamed by a loader) for each evaluation.
    """

    def __init__(
        self,
        data: TensorSplit | EvalBatchesFn,
        name: str,
        every: int,
        batch_size: int,
        log: MetricsLog,
    ):
        self.data, self.name, self.every, self.batch_size, self.log = (
            data,
            name,
            every,
            batch_size,
            log,
        )
        self.last: dict = {}

    def run(self, state: TrainState) -> None:
        precision = state.config.train.precision
        if isinstance(self.data, TensorSplit):
            result = evaluate(state.model, self.data.x, self.data.y, self.batch_size, precision)
        else:
            result = evaluate_batches(state.model, self.data(), precision)
        self.last = {f"eval/{self.name}/{k}": v for k, v in result.items()}
        state.metrics.update(self.last)
        self.log.write({"step": state.step, **self.last})
        if self.log.bar is not None:
            self.log.bar.write(f"step {state.step}: test accuracy {result['accuracy']:.4f}")

    def after_step(self, state: TrainState) -> None:
        if state.step % self.every == 0 and state.step < state.config.train.steps:
            self.run(state)

    def at_end(self, state: TrainState) -> None:
        self.run(state)


class Checkpoint:
    """Saves a checkpoint every ``every`` steps and at the end (atomically)."""

    def __init__(self, run_dir: Path, every: int, keep: int):
        self.run_dir, self.every, self.keep = run_dir, every, keep

    def save(self, state: TrainState) -> None:
        save_checkpoint(
            self.run_dir,
            state.step,
            state.model,
            state.optimizer,
            state.config.to_dict(),
            keep=self.keep,
        )

    def after_step(self, state: TrainState) -> None:
        if state.step % self.every == 0:
            self.save(state)

    def at_end(self, state: TrainState) -> None:
        if state.step % self.every:
            self.save(state)
