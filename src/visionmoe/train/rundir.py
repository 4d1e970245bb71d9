"""Run directories: where a run is written, and how it starts (fresh, resumed or from weights)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from visionmoe.loading import detect_source, load_state, source_experiment
from visionmoe.recipes import get_recipe
from visionmoe.train.checkpoint import atomic_write_text, restore_rng_state
from visionmoe.train.config import ExperimentConfig

DEFAULT_RUNS_DIR = "runs"
DEFAULT_RECIPE = "digits_vmoe"


def default_run_dir(name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(os.environ.get("VISIONMOE_RUNS", DEFAULT_RUNS_DIR)) / f"{name}-{stamp}"


def truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from."""
    if not path.exists():
        return
    keep = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line)["step"] <= step
    ]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def restore_or_init(
    model, optimizer, run_dir: Path, ckpt: dict | None, init, init_fn: Callable
) -> list[str]:
    """Resume from ``ckpt`` (weights, optimizer, RNG, log truncated to its step), or start fresh,
    optionally from the weights at ``init`` (any source ``load_model`` opens) loaded with
    ``init_fn(model, state) -> notes``."""
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        restore_rng_state(ckpt["rng"], ckpt.get("rng_cuda"))
        truncate_metrics(run_dir / "metrics.jsonl", ckpt["meta"]["step"])
        return []
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    return init_fn(model, load_state(init)) if init is not None else []


def initial_config(recipe: str | None, init: str | os.PathLike | None) -> ExperimentConfig:
    """The named recipe; else, with ``init``, the training config stored with those weights.

    A pretrained folder or a vmoe checkpoint holds a model but no training settings, so it needs
    a recipe (the recipe's model must match its architecture; head and image size may differ).
    """
    if recipe is None and init is not None:
        saved = source_experiment(init)
        if saved is None:
            raise ValueError(
                f"--init '{init}' is a {detect_source(init)} source: it holds a model but no "
                "training settings; name a recipe with --recipe (`visionmoe recipes` lists them)"
            )
        return saved
    return get_recipe(recipe or DEFAULT_RECIPE)
