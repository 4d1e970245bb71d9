"""Evaluation sharded over ranks: each rank evaluates 1/W of the test set, the sums are reduced.

Rank r evaluates its block of the data pipeline's seeded evaluation order
(:func:`visionmoe.data.batching.eval_indices`: W contiguous blocks of one fixed permutation, sizes
differing by at most one), read by its own loader (:func:`visionmoe.train.inputs.eval_stream`)
in batches of ceil(B / W) images for a global evaluation batch B. The all-to-all of an
expert-parallel model needs every rank to run the same number of forwards of the same shape, so
a short batch is padded with copies of its last image and a rank with fewer batches runs padding
batches at the end; padded rows are left out of every count (``compute_frac`` includes them).
Routing groups of ``group_images`` images never mix two ranks' images, so with capacity to spare
the result equals single-process evaluation in any order; under capacity pressure images compete
only with the images of their own group, as in any batching.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from visionmoe.distributed.groups import ParallelGroups


def eval_plan(n: int, batch_size: int, world_size: int) -> tuple[int, int]:
    """``(local, num_batches)``: each rank's batch size ceil(B / W) and the number of forwards
    every rank runs, enough for the largest block (blocks cut at floor(r * n / W))."""
    local = max(1, math.ceil(batch_size / world_size))
    largest = max(((r + 1) * n) // world_size - (r * n) // world_size for r in range(world_size))
    return local, math.ceil(largest / local)


def _rows(t: Tensor, count: int) -> Tensor:
    """``count`` copies of the first row of ``t``."""
    return t[:1].expand(count, *t.shape[1:])


def padded(
    batches: Iterable[tuple[Tensor, Tensor]],
    local: int,
    num_batches: int,
    blank: tuple[Tensor, Tensor] | None = None,
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """``(x, y, keep)`` with exactly ``local`` rows each, ``num_batches`` times: each batch
    padded with copies of its last row, then whole padding batches (``keep`` all False) made
    of the last batch, or of the one example ``blank`` when ``batches`` was empty."""
    last = None if blank is None else (_rows(blank[0], local), _rows(blank[1], local))
    count = 0
    for x, y in batches:
        real = len(y)
        if real == 0:
            continue
        fill = local - real
        keep = torch.arange(local, device=y.device) < real
        if fill:
            x = torch.cat([x, _rows(x[-1:], fill)])
            y = torch.cat([y, _rows(y[-1:], fill)])
        last = (x, y)
        count += 1
        yield x, y, keep
    if count > num_batches:
        raise RuntimeError(f"this rank read {count} evaluation batches, expected {num_batches}")
    for _ in range(num_batches - count):
        if last is None:
            raise RuntimeError("a rank with no evaluation images needs a blank example")
        yield last[0], last[1], torch.zeros(local, dtype=torch.bool, device=last[1].device)


@torch.no_grad()
def evaluate_sharded(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    n: int,
    batch_size: int,
    groups: ParallelGroups,
    precision: str = "fp32",
    blank: tuple[Tensor, Tensor] | None = None,
) -> dict:
    """Accuracy, loss (NLL) and compute fraction over the whole test set, every rank helping.

    ``batches`` are this rank's model-ready ``(x, y)`` batches of its block of the ``n``
    test images, ceil(``batch_size`` / W) images each (the last may be shorter), e.g. from
    ``eval_stream(..., batch_size=local, rank=r, world_size=W)``. Every rank must call this;
    every rank gets the same result. ``blank`` is one ``(x, y)`` example used as padding by a
    rank whose block is empty (fewer images than ranks). ``precision`` is ``fp32`` or ``bf16``
    autocast. E^3 member logits are scored by their ensemble prediction.
    """
    from visionmoe.models.ensemble import ensemble_log_probs
    from visionmoe.runtime import autocast

    was_training = model.training
    model.eval()
    local, num_batches = eval_plan(n, batch_size, groups.world_size)
    # correct, loss, processed, possible: summed on the device, read once at the end
    sums = torch.zeros(4, dtype=torch.float64, device=groups.device)
    began = time.perf_counter()
    for x, target, keep in padded(batches, local, num_batches, blank):
        x, target, keep = (t.to(groups.device) for t in (x, target, keep))
        with autocast(groups.device, precision):
            logits, aux = model(x, return_aux=True)
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
