"""Few-shot linear probes on the frozen pre-logits of a trained run (protocol in fewshot.py)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch import nn

from visionmoe.eval.fewshot import FewShotResult, fewshot_evaluate
from visionmoe.eval.inputs import EvalOptions, eval_data_config, open_model, prepare_split
from visionmoe.train.inputs import load_splits


@torch.no_grad()
def extract_features(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Pre-logits (the head's input) in eval mode, as float64 numpy."""
    model.eval()
    feats = [
        model.forward_head(model.forward_features(x[i : i + batch_size]), pre_logits=True)
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(feats).double().numpy()


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
    model, info = open_model(run, options)
    splits = load_splits(eval_data_config(info, options))
    train = prepare_split(splits.train, info)
    test = prepare_split(splits.test, info)
    batch = options.batch_size or 256
    datasets = {
        splits.name: (
            extract_features(model, train.x, batch),
            train.y.numpy(),
            extract_features(model, test.x, batch),
            test.y.numpy(),
        )
    }
    return fewshot_evaluate(datasets, shots=tuple(shots), protocol=protocol, seeds=seeds)
