"""Runs: create or resume a run directory, train, and load a trained run back."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from visionmoe.loading import build_model, detect_source, load_model
from visionmoe.models.limoe import LIMoE
from visionmoe.models.registry import apply_overrides
from visionmoe.models.vit import VisionTransformer
from visionmoe.runtime import resolve_device
from visionmoe.train.checkpoint import (
    CheckpointError,
    atomic_write_text,
    load_checkpoint,
    resolve_checkpoint,
)
from visionmoe.train.config import ExperimentConfig
from visionmoe.train.features import prepare_model
from visionmoe.train.finetune import load_init_weights
from visionmoe.train.hooks import Checkpoint, Evaluate, MetricsLog
from visionmoe.train.inputs import TrainStream, eval_stream, load_splits
from visionmoe.train.loop import TrainState, fit, stream_batch_for_step
from visionmoe.train.optim import build_optimizer
from visionmoe.train.rundir import default_run_dir, restore_or_init

__all__ = ["build_model", "load_run", "run_class_names", "run_training"]


def run_training(
    config: ExperimentConfig | None = None,
    run_dir: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    init: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Train ``config`` into ``run_dir`` (or continue the run at ``resume``).

    ``init`` starts from the weights of another model (fine-tuning): a run, a checkpoint, a
    ``save_pretrained`` folder or a vmoe checkpoint prefix (see :func:`visionmoe.load_model`).
    Returns the summary also written to ``summary.json``.
    """
    start_step, ckpt = 0, None
    if resume is not None:
        run_dir = Path(resume)
        saved = ExperimentConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
        config = saved if config is None else config
        try:
            ckpt = load_checkpoint(run_dir, with_optimizer=True)
            start_step = ckpt["meta"]["step"]
        except CheckpointError:
            if (run_dir / "checkpoints" / "latest").exists():
                raise
            if (run_dir / "sharded" / "latest").exists():
                raise ValueError(
                    f"{run_dir} is an interrupted distributed run; resume it with torchrun ... "
                    f"-m visionmoe.distributed.train --resume {run_dir}"
                ) from None
    if config is None:
        raise ValueError("run_training needs a config or a run to resume")
    if init is not None:
        detect_source(init)  # an unopenable --init fails before anything is written
    resolve_device(config.train.device)  # a CUDA device asked for without CUDA fails here
    # Load the data first: a bad dataset path fails before anything is written.
    splits = load_splits(config.data) if config.text is None else None
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(config.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    torch.manual_seed(config.train.seed)
    atomic_write_text(run_dir / "config.json", config.to_json())
    if config.text is not None:
        from visionmoe.train.contrastive import train_contrastive

        return train_contrastive(config, run_dir, ckpt, resume is not None, init, progress)

    if splits.train.num_classes != config.model.num_classes:
        config = ExperimentConfig(
            **{
                **config.__dict__,
                "model": apply_overrides(config.model, num_classes=splits.train.num_classes),
            }
        )
        atomic_write_text(run_dir / "config.json", config.to_json())
    model, device = prepare_model(build_model(config), config)
    train_data = TrainStream(config, splits.train, device=device)
    test_data = lambda: eval_stream(config, splits.test, device=device)  # noqa: E731  (fresh pass)
    atomic_write_text(run_dir / "classes.json", json.dumps(splits.train.class_names))

    optimizer = build_optimizer(model, config.optim)
    notes = restore_or_init(model, optimizer, run_dir, ckpt, init, load_init_weights)

    log = MetricsLog(
        run_dir,
        config.train.log_every,
        config.train.steps,
        start_step,
        progress,
        config.train.tensorboard,
    )
    evaluator = Evaluate(
        test_data, splits.name, config.train.eval_every, config.train.eval_batch_size, log
    )
    hooks = [
        log,
        evaluator,
        Checkpoint(run_dir, config.train.checkpoint_every, config.train.keep_checkpoints),
    ]
    state = TrainState(config, model, optimizer, step=start_step)
    began = time.perf_counter()
    fit(state, train_data, hooks, batch_fn=stream_batch_for_step)
    final = {k.rsplit("/", 1)[-1]: v for k, v in evaluator.last.items()}
    summary = {
        "name": config.name,
        "run_dir": str(run_dir),
        "dataset": splits.name,
        "steps": state.step,
        "test_accuracy": final.get("accuracy"),
        "test_loss": final.get("loss"),
        "compute_frac": final.get("compute_frac"),
        "train_seconds_this_session": time.perf_counter() - began,
        "resumed_from_step": start_step if resume is not None else None,
        "init": str(init) if init is not None else None,
        "init_notes": notes,
        "num_params": sum(p.numel() for p in model.parameters()),
        "checkpoint": str(resolve_checkpoint(run_dir)),
    }
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def load_run(
    path: str | os.PathLike, **model_overrides
) -> tuple[VisionTransformer | LIMoE, ExperimentConfig]:
    """Model (eval mode, latest weights) and training config of a run or checkpoint directory.

    Image-text runs (``config.text`` set) come back as a :class:`LIMoE`. ``model_overrides`` are
    flat model options applied before the weights load (e.g. ``capacity_factor``). To open any
    source, a pretrained folder or a vmoe checkpoint too, use :func:`visionmoe.load_model`.
    """
    model, info = load_model(path, **model_overrides)
    if info.experiment is None:
        raise ValueError(
            f"'{path}' is a {info.kind} source with no training config; open it with "
            "visionmoe.load_model"
        )
    return model, info.experiment


def run_class_names(path: str | os.PathLike, num_classes: int) -> list[str]:
    """Class names saved with a run (falls back to ``"0" .. "C-1"``)."""
    names = list(load_model(path).info.class_names)
    return names if len(names) == num_classes else [str(i) for i in range(num_classes)]
