"""Data-parallel bookkeeping around an expert-parallel model: gradients, clipping, metrics.

Every rank computes the mean loss over its own B/W images. The single-process loss is the mean
over all B images, i.e. the average of the W local losses, so its gradient is:

- replicated (dense) parameters: the average over ranks of the local gradients (all-reduce / W);
- expert parameters: after the all-to-all backward, rank r's expert gradient already sums the
  local-loss gradients of every rank in its expert-parallel group; summing over the replica group
  (the ranks holding the same slice) covers all W ranks, and dividing by W makes it the gradient
  of the global mean.

A plain bucketed all-reduce after ``backward`` is used instead of DDP hooks: it is deterministic,
needs no knowledge of which parameters the router left unused, and costs one pass over the
gradients, which is noise next to the all-to-all at these sizes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from visionmoe.distributed.expert_parallel import expert_parameter_names
from visionmoe.distributed.groups import ParallelGroups

BUCKET_BYTES = 32 << 20
# Metrics that count things (summed over ranks); every other metric is a per-rank mean.
SUMMED_METRICS = ("tokens_processed",)


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(replicated, expert)`` trainable parameters, each in ``named_parameters`` order."""
    expert_names = expert_parameter_names(model)
    dense, expert = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (expert if name in expert_names else dense).append(param)
    return dense, expert


def _all_reduce_buckets(tensors: list[Tensor], group: ProcessGroup, scale: float) -> None:
    """Sum ``tensors`` over ``group`` in place, in flat buckets, then multiply by ``scale``."""
    buckets: list[list[Tensor]] = []
    size = 0
    for t in tensors:
        if not buckets or size + t.numel() * t.element_size() > BUCKET_BYTES:
            buckets.append([])
            size = 0
        if buckets[-1] and (buckets[-1][0].dtype, buckets[-1][0].device) != (t.dtype, t.device):
            buckets.append([])
            size = 0
        buckets[-1].append(t)
        size += t.numel() * t.element_size()
    for bucket in buckets:
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat, group=group)
        flat.mul_(scale)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def _grads(params: list[nn.Parameter]) -> list[Tensor]:
    # A parameter the forward did not reach gets zeros, so every rank joins the same collectives.
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


@torch.no_grad()
def sync_gradients(model: nn.Module, groups: ParallelGroups) -> None:
    """Turn local-loss gradients into gradients of the global-batch mean loss (see module doc)."""
    dense, expert = split_parameters(model)
    scale = 1.0 / groups.world_size
    if groups.world_size > 1:
        _all_reduce_buckets(_grads(dense), dist.group.WORLD, scale)
    expert_grads = _grads(expert)
    if groups.replica_group is not None:
        _all_reduce_buckets(expert_grads, groups.replica_group, scale)
    elif expert_grads:
        torch._foreach_mul_(expert_grads, scale)


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float | None, groups: ParallelGroups) -> Tensor:
    """Global-norm clipping over the whole (sharded) model, as ``clip_grad_norm_`` in one process.

    Replicated gradients are equal on every rank after :func:`sync_gradients` and count once;
    each expert slice counts once, so squared norms are summed over the expert-parallel group
    only. The clip coefficient follows ``torch.nn.utils.clip_grad_norm_`` exactly.
    """
    dense, expert = split_parameters(model)
    dense_g = [p.grad for p in dense if p.grad is not None]
    expert_g = [p.grad for p in expert if p.grad is not None]
    device = groups.device

    def squared(grads: list[Tensor]) -> Tensor:
        if not grads:
            return torch.zeros((), device=device)
        return torch.stack(torch._foreach_norm(grads, 2)).float().pow(2).sum().to(device)

    expert_sq = squared(expert_g)
    if groups.expert_group is not None and groups.expert_parallel > 1:
        dist.all_reduce(expert_sq, group=groups.expert_group)
    total = (squared(dense_g) + expert_sq).sqrt()
    if max_norm is not None and max_norm > 0:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        grads = dense_g + expert_g
        if grads:
            torch._foreach_mul_(grads, coef.to(grads[0].device))
    return total


@torch.no_grad()
def broadcast_parameters(model: nn.Module, groups: ParallelGroups) -> None:
    """Make replicas bitwise equal: replicated tensors from rank 0, expert slices from the first
    replica. Seeded construction already agrees on one machine; this guards against init that
    differs across hosts or devices."""
    if groups.world_size == 1:
        return
    dense, expert = split_parameters(model)
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    for t in [p.data for p in dense] + buffers:
        dist.broadcast(t, src=0)
    if groups.replica_group is not None:
        src = dist.get_global_rank(groups.replica_group, 0)
        for p in expert:
            dist.broadcast(p.data, src=src, group=groups.replica_group)


def mean_over_ranks(metrics: dict[str, float], groups: ParallelGroups) -> dict[str, float]:
    """Average scalar metrics over ranks (counts are summed). Every rank needs the same keys."""
    if groups.world_size == 1:
        return dict(metrics)
    names = sorted(metrics)
    values = torch.tensor([metrics[n] for n in names], dtype=torch.float64, device=groups.device)
    dist.all_reduce(values)
    out = {}
    for name, total in zip(names, values.tolist(), strict=True):
        summed = name.rsplit("/", 1)[-1] in SUMMED_METRICS
        out[name] = total if summed else total / groups.world_size
    return out
