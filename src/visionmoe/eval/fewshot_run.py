"""Few-shot linear probes on the frozen pre-logits of a trained run (protocol in fewshot.py)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from visionmoe.eval.fewshot import FewShotResult, fewshot_evaluate


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
) -> FewShotResult:
    """Closed-form ridge probes on a run's features, on its own dataset or another one.

    Example: ``fewshot_run("runs/digits_vmoe-...", shots=(1, 5, 10, 25))``.
    """
    from visionmoe.train.config import DataConfig
    from visionmoe.train.inputs import load_splits, to_tensors
    from visionmoe.train.run import load_run

    model, config = load_run(run)
    data = config.data if kind is None else DataConfig(kind=kind, path=path)
    splits = load_splits(data)
    train = to_tensors(splits.train, config.model)
    test = to_tensors(splits.test, config.model)
    datasets = {
        splits.name: (
            extract_features(model, train.x),
            train.y.numpy(),
            extract_features(model, test.x),
            test.y.numpy(),
        )
    }
    return fewshot_evaluate(datasets, shots=tuple(shots), protocol=protocol, seeds=seeds)
