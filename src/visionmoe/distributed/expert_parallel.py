"""Expert parallelism: each rank holds E/N experts and exchanges expert buffers by all-to-all.

Shape legend: E experts (whole layer), El = E/N experts on this rank, C slots per expert buffer
(this rank's tokens), D width, F hidden width, N expert-parallel ranks.

The static dispatch of :mod:`visionmoe.layers.dispatch` fills a fixed ``(E, C, D)`` buffer whose
size depends only on the config and the local token count, so when every rank has the same number
of tokens the buffers can be swapped with an equal-split all-to-all and no size exchange:

    (E, C, D) = (N, El, C, D)  --all-to-all-->  (N, El, C, D): my El experts' rows from every rank
    -> experts on (El, N*C, D) -> (N, El, C, D) --all-to-all--> (E, C, D) back in place.

An equal-split all-to-all is its own inverse, so its backward is the same exchange applied to the
gradient; expert gradients therefore already sum the contributions of every rank's tokens.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from visionmoe.layers.experts import Experts
from visionmoe.layers.mlp import gelu
from visionmoe.layers.moe import SoftMoE, SparseMoE


class _AllToAll(torch.autograd.Function):
    """Equal-split all-to-all along dim 0 whose gradient is the same all-to-all."""

    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup | None) -> Tensor:
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


def all_to_all(x: Tensor, group: ProcessGroup | None = None) -> Tensor:
    """Chunk i of dim 0 goes to rank i; chunk j of the result came from rank j (differentiable)."""
    return _AllToAll.apply(x, group)


def expert_range(num_experts: int, world_size: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` of the contiguous expert slice held by ``rank`` of ``world_size``."""
    if num_experts % world_size:
        raise ValueError(
            f"{num_experts} experts cannot be split evenly over {world_size} expert-parallel ranks"
        )
    size = num_experts // world_size
    return rank * size, (rank + 1) * size


class ExpertParallelExperts(nn.Module):
    """This rank's slice of an :class:`Experts` bank behind the same ``forward(x_ECD)`` contract.

    Parameters have the names of :class:`Experts` (``w1 (El, D, F)``, ``b1``, ``w2``, ``b2``) so
    a sharded model's state dict differs from the single-process one only in the experts' first
    dimension. Needs every rank of ``group`` to call forward with the same ``(E, C, D)`` shape.
    """

    def __init__(self, experts: Experts, group: ProcessGroup | None = None):
        super().__init__()
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.num_experts = experts.num_experts
        start, stop = expert_range(experts.num_experts, self.world_size, self.rank)
        self.expert_start, self.num_local_experts = start, stop - start
        self.gelu_variant = experts.gelu_variant
        self.drop = nn.Dropout(experts.drop.p)
        for name in ("w1", "b1", "w2", "b2"):
            full = getattr(experts, name)
            setattr(self, name, nn.Parameter(full.detach()[start:stop].clone(), full.requires_grad))

    def __deepcopy__(self, memo: dict) -> ExpertParallelExperts:
        # A process group is a handle that cannot be copied; copies (EMA, evaluation) share it.
        if self.group is not None:
            memo.setdefault(id(self.group), self.group)
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    def extra_repr(self) -> str:
        stop = self.expert_start + self.num_local_experts
        return f"experts [{self.expert_start}, {stop}) of {self.num_experts}"

    def local_forward(self, x_ECD: Tensor) -> Tensor:
        """The local experts on their own buffers; the arithmetic of ``Experts.forward``."""
        h_ECF = torch.baddbmm(self.b1.unsqueeze(1).to(x_ECD.dtype), x_ECD, self.w1.to(x_ECD.dtype))
        h_ECF = self.drop(gelu(h_ECF, self.gelu_variant))
        out = torch.baddbmm(self.b2.unsqueeze(1).to(x_ECD.dtype), h_ECF, self.w2.to(x_ECD.dtype))
        return self.drop(out)

    def forward(self, x_ECD: Tensor) -> Tensor:
        E, C, D = x_ECD.shape
        if E != self.num_experts:
            raise ValueError(f"expected buffers for {self.num_experts} experts, got {E}")
        if self.world_size == 1:
            return self.local_forward(x_ECD)
        N, El = self.world_size, self.num_local_experts
        recv_NECD = all_to_all(x_ECD, self.group).view(N, El, C, D)
        mine_ECD = recv_NECD.transpose(0, 1).reshape(El, N * C, D)
        out_NECD = self.local_forward(mine_ECD).view(El, N, C, D).transpose(0, 1)
        return all_to_all(out_NECD, self.group).view(E, C, D)

    def forward_chunks(self, x_ND: Tensor, counts: list[int]) -> Tensor:
        raise RuntimeError(
            "expert-parallel experts need fixed-size buffers: use dispatch='static' (the compact "
            "path sends a data-dependent number of rows per expert)"
        )


def moe_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> MoE layer (sparse or soft) whose expert bank can be sharded."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (SparseMoE, SoftMoE))}


def shard_moe_experts(model: nn.Module, group: ProcessGroup | None = None) -> nn.Module:
    """Replace every MoE layer's expert bank by this rank's slice of it, in place.

    Rank r of ``group`` (size N) keeps experts ``[r*E/N, (r+1)*E/N)``. Sparse layers switch to
    the static dispatch, whose buffer shapes are the same on every rank. Every layer is checked
    before any is changed, so a world size that does not divide E leaves the model untouched.
    Routers and everything else stay replicated (data parallel). Returns the model.
    """
    world = dist.get_world_size(group)
    layers = moe_layers(model)
    for name, layer in layers.items():
        if isinstance(layer.experts, ExpertParallelExperts):
            raise ValueError(f"{name} is already expert-parallel")
        expert_range(layer.experts.num_experts, world, 0)
    for layer in layers.values():
        layer.experts = ExpertParallelExperts(layer.experts, group)
        if isinstance(layer, SparseMoE):
            layer.dispatch = "static"
    return model


def expert_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> expert bank (sharded or not) of every MoE layer."""
    return {f"{n}.experts" if n else "experts": m.experts for n, m in moe_layers(model).items()}


def expert_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that live in expert banks (sharded, or replicated if N = 1)."""
    return {
        f"{prefix}.{name}"
        for prefix, module in expert_modules(model).items()
        for name, _ in module.named_parameters()
    }
