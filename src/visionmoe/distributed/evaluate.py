"""Evaluation sharded over ranks: each rank evaluates 1/W of the test set, the sums are reduced.

Rank r evaluates its block of the data pipeline's seeded evaluation order
(:func:`visionmoe.data.batching.eval_indices`: W contiguous blocks of one fixed permutation, sizes
differing by at most one). The all-to-all of an expert-parallel model needs every rank to run
the same number of batches of the same shape, so a block shorter than S = ceil(n / W) is padded
with copies of its last example; padded rows are left out of every count (``compute_frac``
includes them). Routing groups of ``group_images`` images never mix images of two ranks, so
with capacity to spare the result equals single-process evaluation in any order; under capacity
pressure images compete only with the images of their own group, as in any batching.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from visionmoe.distributed.groups import ParallelGroups


def shard_rows(n: int, seed: int, world_size: int, rank: int) -> tuple[torch.Tensor, int]:
    """``(rows, real)``: the ceil(n / world_size) test-set rows this rank evaluates, its seeded
    block first (``real`` rows) and then copies of the block's last row as padding."""
    from visionmoe.data.batching import eval_indices

    block = torch.from_numpy(eval_indices(n, seed, rank, world_size))
    share = math.ceil(n / world_size)
    fill = block[-1:] if len(block) else torch.zeros(1, dtype=torch.int64)
    return torch.cat([block, fill.expand(share - len(block))]), len(block)


@torch.no_grad()
def evaluate_sharded(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    groups: ParallelGroups,
    seed: int = 0,
    precision: str = "fp32",
) -> dict:
    """Accuracy, loss (NLL) and compute fraction over the whole test set, every rank helping.

    ``batch_size`` is the global evaluation batch: each rank runs ceil(batch_size / W) images
    at a time. Every rank of ``groups`` must call this with the same ``x``/``y`` length; every
    rank gets the same result. ``seed`` picks the evaluation order (``train.seed`` in training);
    ``precision`` is ``fp32`` or ``bf16`` autocast. E^3 member logits are scored by their
    ensemble prediction.
    """
    from visionmoe.models.ensemble import ensemble_log_probs
    from visionmoe.runtime import autocast

    was_training = model.training
    model.eval()
    n = len(y)
    idx, num_real = shard_rows(n, seed, groups.world_size, groups.rank)
    real = torch.arange(len(idx)) < num_real
    share = len(idx)
    local = max(1, math.ceil(batch_size / groups.world_size))
    # correct, loss, processed, possible: summed on the device, read once at the end
    sums = torch.zeros(4, dtype=torch.float64, device=groups.device)
    began = time.perf_counter()
    for i in range(0, share, local):
        rows = idx[i : i + local]
        with autocast(groups.device, precision):
            logits, aux = model(x[rows.to(x.device)].to(groups.device), return_aux=True)
        target = y[rows.to(y.device)].to(groups.device)
        keep = real[i : i + local].to(groups.device)
        if logits.ndim == 3:
            log_probs = ensemble_log_probs(logits)
        else:
            log_probs = torch.log_softmax(logits.float(), -1)
        hits = (log_probs.argmax(-1) == target) & keep
        nll = F.nll_loss(log_probs, target, reduction="none")
        sums[0] += hits.sum()
        sums[1] += torch.where(keep, nll.double(), 0.0).sum()
        for layer in aux.layers.values():
            if layer.plan is not None:
                sums[2] += layer.metrics["tokens_processed"]
                sums[3] += layer.plan.num_tokens * layer.plan.assignments_per_token
    if groups.world_size > 1:
        dist.all_reduce(sums)
    seconds = time.perf_counter() - began
    model.train(was_training)
    correct, loss_sum, processed, possible = sums.cpu().tolist()
    return {
        "accuracy": correct / max(n, 1),
        "loss": loss_sum / max(n, 1),
        "compute_frac": processed / possible if possible else 1.0,
        "seconds": seconds,
        "images_per_s": n / seconds if seconds > 0 else float("inf"),
        "num_examples": n,
    }
