"""Evaluation sharded over ranks: each rank evaluates 1/W of the test set, the sums are reduced.

Rank r takes the contiguous slice ``[r*S, (r+1)*S)`` of the test set, S = ceil(n / W). The
all-to-all of an expert-parallel model needs every rank to run the same number of batches of
the same shape, so the last rank(s) pad their slice with copies of the final example; padded
rows are left out of every count. When routing groups tile each batch (``group_images`` images,
S and the per-rank batch multiples of it) every real image is routed as in one process and the
accuracy and loss equal single-process evaluation; a padded row can otherwise share a routing
group (and its capacity) with real ones. ``compute_frac`` counts the padded rows too.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from visionmoe.distributed.groups import ParallelGroups


def shard_bounds(n: int, world_size: int, rank: int) -> tuple[int, int, int]:
    """``(start, stop, padded)``: this rank's real rows ``[start, stop)`` of ``n``, padded to
    ``padded`` = ceil(n / world_size) rows."""
    share = math.ceil(n / world_size)
    start = min(rank * share, n)
    return start, min(start + share, n), share


@torch.no_grad()
def evaluate_sharded(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    groups: ParallelGroups,
) -> dict:
    """Accuracy, loss (NLL) and compute fraction over the whole test set, every rank helping.

    ``batch_size`` is the global evaluation batch: each rank runs ceil(batch_size / W) images
    at a time. Every rank of ``groups`` must call this with the same ``x``/``y`` length; every
    rank gets the same result. E^3 member logits are scored by their ensemble prediction.
    """
    from visionmoe.models.ensemble import ensemble_log_probs

    was_training = model.training
    model.eval()
    n = len(y)
    start, stop, share = shard_bounds(n, groups.world_size, groups.rank)
    idx = torch.arange(start, start + share).clamp(max=max(n - 1, 0))
    real = torch.arange(start, start + share) < stop
    local = max(1, math.ceil(batch_size / groups.world_size))
    sums = torch.zeros(4, dtype=torch.float64)  # correct, loss, processed, possible
    began = time.perf_counter()
    for i in range(0, share, local):
        rows = idx[i : i + local]
        keep = real[i : i + local].to(y.device)
        logits, aux = model(x[rows.to(x.device)], return_aux=True)
        target = y[rows.to(y.device)]
        if logits.ndim == 3:
            log_probs = ensemble_log_probs(logits)
        else:
            log_probs = torch.log_softmax(logits.float(), -1)
        hits = (log_probs.argmax(-1) == target) & keep
        nll = F.nll_loss(log_probs, target, reduction="none")
        sums[0] += float(hits.sum())
        sums[1] += float(nll[keep].double().sum())
        for layer in aux.layers.values():
            if layer.plan is not None:
                sums[2] += float(layer.metrics["tokens_processed"])
                sums[3] += layer.plan.num_tokens * layer.plan.assignments_per_token
    if groups.world_size > 1:
        sums = sums.to(groups.device)
        dist.all_reduce(sums)
        sums = sums.cpu()
    seconds = time.perf_counter() - began
    model.train(was_training)
    correct, loss_sum, processed, possible = sums.tolist()
    return {
        "accuracy": correct / max(n, 1),
        "loss": loss_sum / max(n, 1),
        "compute_frac": processed / possible if possible else 1.0,
        "seconds": seconds,
        "images_per_s": n / seconds if seconds > 0 else float("inf"),
        "num_examples": n,
    }
