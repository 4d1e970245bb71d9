"""Few-shot linear probes on the frozen pre-logits of a trained run (protocol in fewshot.py)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from visionmoe.eval.fewshot import FewShotResult, fewshot_evaluate
from visionmoe.eval.inputs import EvalOptions, open_for_eval


@torch.no_grad()
def extract_features(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Pre-logits (the head's input) in eval mode, as float64 numpy."""
    batches = [(x[i : i + batch_size], None) for i in range(0, len(x), batch_size)]
    return batch_features(model, batches)[0]


@torch.no_grad()
def batch_features(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
    precision: str = "fp32",
) -> tuple[np.ndarray, np.ndarray | None]:
    """Pre-logits of streamed ``(x, y)`` batches (float64) and their labels (None if absent),
    computed on the model's device in ``precision``."""
    from visionmoe.runtime import autocast

    model.eval()
    device = next(model.parameters()).device
    feats, labels = [], []
    for x, y in batches:
        with autocast(device, precision):
            tokens = model.forward_features(x.to(device))
            feats.append(model.forward_head(tokens, pre_logits=True).float().cpu())
        if y is not None:
            labels.append(y)
    return (
        torch.cat(feats).double().numpy(),
        torch.cat(labels).numpy() if labels else None,
    )


def fewshot_run(
    run: str,
    shots: tuple[int, ...] = (1, 5, 10, 25),
    kind: str | None = None,
    path: str | None = None,
    protocol: str = "vmoe",
    seeds: tuple[int, ...] | None = None,
    *,
    options: EvalOptions | None = None,
) -> FewShotResult:
    """Closed-form ridge probes on a model's features, on its own dataset or another one.

    ``run`` is any source :func:`visionmoe.load_model` opens; ``kind`` / ``path`` (or
    ``options``: ``--data``, ``--set data.kind=...``, batch and image size) name the dataset.
    Example: ``fewshot_run("runs/digits_vmoe-...", shots=(1, 5, 10, 25))``.
    """
    options = options or EvalOptions()
    if path is not None:
        options = replace(options, data=path)
    if kind is not None:
        options = replace(options, settings=(*options.settings, f"data.kind={kind}"))
    inputs = open_for_eval(run, options, classifier=False)
    precision = options.precision
    train_x, train_y = batch_features(inputs.model, inputs.batches(inputs.splits.train), precision)
    test_x, test_y = batch_features(inputs.model, inputs.batches(), precision)
    datasets = {inputs.splits.name: (train_x, train_y, test_x, test_y)}
    return fewshot_evaluate(datasets, shots=tuple(shots), protocol=protocol, seeds=seeds)
