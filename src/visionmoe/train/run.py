"""Runs: create or resume a run directory, train, and load a trained run back."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime
from pathlib import Path

import torch
from torch import nn

from visionmoe.models.limoe import LIMoE
from visionmoe.models.registry import apply_overrides
from visionmoe.models.vit import VisionTransformer
from visionmoe.train.checkpoint import (
    CheckpointError,
    atomic_write_text,
    load_checkpoint,
    resolve_checkpoint,
    restore_rng_state,
)
from visionmoe.train.config import ExperimentConfig
from visionmoe.train.features import prepare_model
from visionmoe.train.finetune import load_init_weights
from visionmoe.train.hooks import Checkpoint, Evaluate, MetricsLog
from visionmoe.train.inputs import TrainStream, eval_stream, load_splits
from visionmoe.train.loop import TrainState, fit, stream_batch_for_step
from visionmoe.train.optim import build_optimizer

DEFAULT_RUNS_DIR = "runs"


def default_run_dir(name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(os.environ.get("VISIONMOE_RUNS", DEFAULT_RUNS_DIR)) / f"{name}-{stamp}"


def build_model(config: ExperimentConfig) -> nn.Module:
    """The model a config describes: a LIMoE when ``config.text`` is set, else a ViT."""
    if config.text is not None:
        return LIMoE(config.model, config.text)
    return VisionTransformer(config.model)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from."""
    if not path.exists():
        return
    keep = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line)["step"] <= step
    ]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def restore_or_init(model, optimizer, run_dir: Path, ckpt: dict | None, init, init_fn) -> list[str]:
    """Resume from ``ckpt`` (weights, optimizer, RNG, log truncated to its step), or start fresh,
    optionally from the weights at ``init`` loaded with ``init_fn(model, state) -> notes``."""
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        restore_rng_state(ckpt["rng"], ckpt.get("rng_cuda"))
        _truncate_metrics(run_dir / "metrics.jsonl", ckpt["meta"]["step"])
        return []
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    return init_fn(model, load_checkpoint(init)["model"]) if init is not None else []


def run_training(
    config: ExperimentConfig | None = None,
    run_dir: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    init: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Train ``config`` into ``run_dir`` (or continue the run at ``resume``).

    ``init`` starts from the weights of another run or checkpoint (fine-tuning). Returns the
    summary also written to ``summary.json``.
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
    """Model (eval mode, latest weights) and config of a run or checkpoint directory.

    Image-text runs (``config.text`` set) come back as a :class:`LIMoE`.

    ``model_overrides`` are flat model options applied before the weights load (e.g.
    ``capacity_factor`` or ``dispatch``).
    """
    ckpt = load_checkpoint(path)
    config = ExperimentConfig.from_dict(ckpt["meta"]["config"])
    if model_overrides:
        config = ExperimentConfig(
            **{**config.__dict__, "model": apply_overrides(config.model, **model_overrides)}
        )
    model = build_model(config)
    model.load_state_dict(ckpt["model"])
    return model.eval(), config


def run_class_names(path: str | os.PathLike, num_classes: int) -> list[str]:
    """Class names saved with a run (falls back to ``"0" .. "C-1"``)."""
    ckpt = resolve_checkpoint(path)
    for candidate in (ckpt.parent.parent / "classes.json", ckpt / "classes.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return [str(i) for i in range(num_classes)]
