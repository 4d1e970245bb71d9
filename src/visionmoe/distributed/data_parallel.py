"""Data parallelism around an expert-parallel model: PyTorch's DDP or FSDP2, plus the experts.

Every rank computes the mean loss over its own B/W images. The single-process loss is the mean
over all B images, i.e. the average of the W local losses, so its gradient is:

- replicated (dense) parameters: the average over ranks of the local gradients. PyTorch does
  this: :class:`~torch.nn.parallel.DistributedDataParallel` (bucketed all-reduce overlapped with
  the backward, the default) or FSDP2's :func:`~torch.distributed.fsdp.fully_shard` (each rank
  stores 1/W of the dense weights, gradients and optimizer state; for dense parts that do not
  fit one device). Both average over the whole world and are told to leave the experts alone.
- expert parameters: after the all-to-all backward, rank r's expert gradient already sums the
  local-loss gradients of every rank in its expert-parallel row; summing over the mesh's ``dp``
  column (the ranks holding the same slice) covers all W ranks, and dividing by W makes it the
  gradient of the global mean (:func:`reduce_expert_gradients`, after ``backward``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from visionmoe.distributed.expert_parallel import expert_parameter_names
from visionmoe.distributed.groups import ParallelGroups

DENSE_MODES = ("ddp", "fsdp")
# Metrics that count things (summed over ranks); every other metric is a per-rank mean.
SUMMED_METRICS = ("tokens_processed",)


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(replicated, expert)`` trainable parameters, each in ``named_parameters`` order."""
    model = unwrap(model)
    expert_names = expert_parameter_names(model)
    dense, expert = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (expert if name in expert_names else dense).append(param)
    return dense, expert


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 shards a model in place and keeps its names)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def world_mesh(groups: ParallelGroups) -> DeviceMesh:
    """A 1-D mesh over every rank: the dense part is replicated on all of them."""
    return DeviceMesh.from_group(dist.group.WORLD, groups.device.type, mesh_dim_names=("world",))


def wrap_data_parallel(model: nn.Module, groups: ParallelGroups, dense: str = "ddp") -> nn.Module:
    """Hand the dense part of an (expert-sharded) model to DDP or FSDP2; returns what to train.

    ``"ddp"`` returns a :class:`DistributedDataParallel` wrapper whose reducer ignores the expert
    parameters. ``"fsdp"`` applies ``fully_shard`` to every transformer block and to the root
    over all ranks, expert parameters excluded (``ignored_params``), and returns the model
    itself, whose dense parameters are now DTensors. Call after :func:`broadcast_parameters`.
    """
    if dense not in DENSE_MODES:
        raise ValueError(f"parallel.dense must be one of {DENSE_MODES}, got {dense!r}")
    expert_names = expert_parameter_names(model)
    if dense == "ddp":
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, sorted(expert_names)
        )
        on_cuda = groups.device.type == "cuda"
        return DistributedDataParallel(
            model,
            device_ids=[groups.device] if on_cuda else None,
            process_group=dist.group.WORLD,
            forward_sync_buffers=False,  # buffers are constants here; evaluation needs none
            init_sync=False,  # broadcast_parameters already made the replicas equal
        )
    mesh = world_mesh(groups)
    # FSDP2 cannot shard 0-d parameters (Soft MoE's scale): they stay replicated, reduced with
    # the experts by reduce_expert_gradients.
    left_out = {p for n, p in model.named_parameters() if n in expert_names or p.ndim == 0}
    for block in getattr(model, "blocks", []):
        mine = {p for p in block.parameters() if p in left_out}
        fully_shard(block, mesh=mesh, ignored_params=mine)
    fully_shard(model, mesh=mesh, ignored_params=left_out)
    return model


def split_sharded_groups(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Put FSDP2's DTensor parameters and the plain (expert) ones in separate parameter groups
    with the same settings: the foreach optimizer kernels refuse lists that mix the two.
    Call before the first step; returns ``optimizer``."""
    groups = []
    for group in optimizer.param_groups:
        sharded = [p for p in group["params"] if isinstance(p, DTensor)]
        plain = [p for p in group["params"] if not isinstance(p, DTensor)]
        groups += [{**group, "params": params} for params in (sharded, plain) if params]
    optimizer.param_groups = groups
    return optimizer


def _all_reduce_mean(grads: list[Tensor], group, world_size: int) -> None:
    """Sum ``grads`` over ``group`` (None: no exchange), then divide by the world size."""
    if not grads:
        return
    if group is not None:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        torch._foreach_copy_(
            grads,
            [
                c.view_as(g)
                for c, g in zip(flat.split([g.numel() for g in grads]), grads, strict=True)
            ],
        )
    torch._foreach_mul_(grads, 1.0 / world_size)


@torch.no_grad()
def reduce_expert_gradients(model: nn.Module, groups: ParallelGroups) -> None:
    """Expert gradients of the global-batch mean loss (see module doc); DDP or FSDP2 did the
    dense ones, except the 0-d parameters FSDP2 leaves replicated, averaged here over all."""
    dense, expert = split_parameters(model)
    for p in expert:  # a bank the forward did not reach still joins the collective
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    _all_reduce_mean([p.grad for p in expert], groups.replica_group, groups.world_size)
    if any(isinstance(p, DTensor) for p in dense):
        loose = [p for p in dense if not isinstance(p, DTensor)]
        for p in loose:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        world = dist.group.WORLD if groups.world_size > 1 else None
        _all_reduce_mean([p.grad for p in loose], world, groups.world_size)


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float | None, groups: ParallelGroups) -> Tensor:
    """Global-norm clipping over the whole (sharded) model, as ``clip_grad_norm_`` in one process.

    DDP's dense gradients are equal on every rank and count once; FSDP2's are DTensor shards of
    the world whose squared norms are summed over all ranks; each expert slice counts once, so
    its squared norms are summed over the expert-parallel row only. The clip coefficient follows
    ``torch.nn.utils.clip_grad_norm_`` exactly.
    """
    dense, expert = split_parameters(model)
    dense_g = [p.grad for p in dense if p.grad is not None]
    expert_g = [p.grad for p in expert if p.grad is not None]
    sharded_g = [g.to_local() for g in dense_g if isinstance(g, DTensor)]
    dense_g = [g for g in dense_g if not isinstance(g, DTensor)]
    device = groups.device

    def squared(grads: list[Tensor]) -> Tensor:
        if not grads:
            return torch.zeros((), device=device)
        return torch.stack(torch._foreach_norm(grads, 2)).float().pow(2).sum().to(device)

    sharded_sq, dense_sq, expert_sq = squared(sharded_g), squared(dense_g), squared(expert_g)
    if sharded_g:
        dist.all_reduce(sharded_sq)
    if groups.expert_group is not None and groups.expert_parallel > 1:
        dist.all_reduce(expert_sq, group=groups.expert_group)
    total = (sharded_sq + dense_sq + expert_sq).sqrt()
    if max_norm is not None and max_norm > 0:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        grads = [g for g in sharded_g + dense_g + expert_g if g.numel()]
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
    buffers = [b for b in unwrap(model).buffers() if b.is_floating_point()]
    for t in [p.data for p in dense] + buffers:
        dist.broadcast(t, src=0)
    if groups.replica_group is not None:
        src = dist.get_global_rank(groups.replica_group, 0)
        for p in expert:
            dist.broadcast(p.data, src=src, group=groups.replica_group)


def mean_over_ranks(
    metrics: dict[str, torch.Tensor], groups: ParallelGroups
) -> dict[str, torch.Tensor]:
    """Average 0-dim metric tensors over ranks (counts are summed): one all-reduce of them
    stacked, on this rank's device, nothing read back to the host. Every rank calls it with the
    same keys."""
    if groups.world_size == 1:
        return dict(metrics)
    names = sorted(metrics)
    values = torch.stack([metrics[n].to(groups.device, torch.float64) for n in names])
    dist.all_reduce(values)
    out = {}
    for name, total in zip(names, values.unbind(), strict=True):
        summed = name.rsplit("/", 1)[-1] in SUMMED_METRICS
        out[name] = total if summed else total / groups.world_size
    return out
