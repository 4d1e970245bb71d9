"""A bank of E expert MLPs with stacked weights.

Shape legend: E experts, C rows per expert buffer, N rows total, D width, F hidden width.
Weights are stored stacked, ``w1 (E, D, F)``, ``w2 (E, F, D)``, which matches the vmoe parameter
layout (``Moe/Mlp/Dense_0/kernel (E, D, M)``) and lets one batched matmul run all experts on
fixed-size buffers.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from visionmoe.layers.grouped import grouped_mlp
from visionmoe.layers.mlp import GELU_VARIANTS, gelu

EXPERT_INITS = ("shared", "independent")


class Experts(nn.Module):
    """E two-layer MLPs: ``Linear(D->F) -> GELU -> Dropout -> Linear(F->D) -> Dropout``.

    ``expert_init="shared"`` gives every expert the same initial weights, as in the V-MoE and E^3
    configs (the router breaks the symmetry); ``"independent"`` draws each expert separately.
    """

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden_dim: int,
        gelu_variant: str = "tanh",
        dropout: float = 0.0,
        expert_init: str = "shared",
    ):
        super().__init__()
        if expert_init not in EXPERT_INITS:
            raise ValueError(f"expert_init must be one of {EXPERT_INITS}, got {expert_init!r}")
        if gelu_variant not in GELU_VARIANTS:
            raise ValueError(f"gelu_variant must be one of {GELU_VARIANTS}, got {gelu_variant!r}")
        self.num_experts = num_experts
        self.gelu_variant = gelu_variant
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.b2 = nn.Parameter(torch.empty(num_experts, dim))
        self.drop = nn.Dropout(dropout)
        self.cache_casts = True
        self._cast_cache: tuple | None = None
        self._reuse_in_training = False  # set by reuse_weight_casts()
        self.reset_parameters(expert_init)

    def reset_parameters(self, expert_init: str = "shared") -> None:
        dim, hidden = self.w1.shape[1:]
        count = 1 if expert_init == "shared" else self.num_experts
        with torch.no_grad():
            for w in (self.w1, self.w2):
                bound = math.sqrt(6.0 / (dim + hidden))  # Xavier-uniform per expert
                w[:count].uniform_(-bound, bound)
            self.b1[:count].normal_(std=1e-6)
            self.b2[:count].normal_(std=1e-6)
            if count == 1:
                for p in (self.w1, self.b1, self.w2, self.b2):
                    p.copy_(p[:1].expand_as(p))

    def weights(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(w1, b1, w2, b2)`` in ``dtype``; gradients flow back to the parameters.

        For inference (eval mode or grad disabled) a cast to a lower precision (bf16 autocast) is
        cached while the parameters are unchanged (same storage, same version counter), so
        E x D x F x 2 weights are cast once, not on every forward; ``train()`` / ``eval()`` drop
        the cache when they change the mode. In training with grad enabled the weights are cast
        on every forward: an optimizer step changes them anyway, and fused optimizer kernels
        update parameters in place without bumping their version counters (torch 2.13), which
        would leave a cached copy stale; inside :func:`reuse_weight_casts` (the micro-batches of
        one gradient-accumulation step) training reuses the cast too. The cached copy stays
        alive between calls (half the bytes of the fp32 weights); ``cache_casts = False`` turns
        caching off. Under ``torch.compile`` the cast is a plain ``.to`` that the compiler fuses.
        """
        params = (self.w1, self.b1, self.w2, self.b2)
        if dtype == self.w1.dtype:
            return params
        training = self.training and torch.is_grad_enabled() and not self._reuse_in_training
        if torch.compiler.is_compiling() or not self.cache_casts or training:
            return tuple(p.to(dtype) for p in params)
        key = (dtype, tuple((p.data_ptr(), p._version) for p in params))
        cached = self._cast_cache
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, tuple(p.detach().to(dtype) for p in params))
            self._cast_cache = cached
        return tuple(_CachedCast.apply(p, low) for p, low in zip(params, cached[1], strict=True))

    def train(self, mode: bool = True) -> Experts:
        if mode != self.training:
            self._cast_cache = None  # a mode switch often brackets weight updates
        return super().train(mode)

    def forward(self, x_ECD: Tensor) -> Tensor:
        """All experts on fixed-size buffers: one batched matmul per layer, in the compute dtype."""
        dtype = compute_dtype(x_ECD)
        x_ECD = x_ECD.to(dtype)
        w1, b1, w2, b2 = self.weights(dtype)
        h_ECF = torch.baddbmm(b1.unsqueeze(1), x_ECD, w1)
        h_ECF = self.drop(gelu(h_ECF, self.gelu_variant))
        return self.drop(torch.baddbmm(b2.unsqueeze(1), h_ECF, w2))

    def forward_chunks(self, x_ND: Tensor, counts: list[int]) -> Tensor:
        """Rows sorted by expert, ``counts[e]`` rows for expert e: grouped GEMMs in the compute
        dtype (see :mod:`visionmoe.layers.grouped`); the output has the compute dtype."""
        dtype = compute_dtype(x_ND)
        x_ND = x_ND.to(dtype)
        w1, b1, w2, b2 = self.weights(dtype)
        if self.drop.p == 0 or not self.training:
            with torch.autocast(device_type=x_ND.device.type, enabled=False):
                return grouped_mlp(x_ND, w1, b1, w2, b2, counts, self.gelu_variant)
        outs = []
        # unbind, not w[e]: the backward of E selects would zero-fill E full-size gradients.
        w1s, b1s, w2s, b2s = (p.unbind(0) for p in (w1, b1, w2, b2))
        for e, chunk in enumerate(torch.split(x_ND, counts)):
            if chunk.shape[0]:
                h = self.drop(gelu(torch.addmm(b1s[e], chunk, w1s[e]), self.gelu_variant))
                outs.append(torch.addmm(b2s[e], h, w2s[e]))
        return self.drop(torch.cat(outs)) if outs else x_ND.new_zeros(0, x_ND.shape[-1])


@contextlib.contextmanager
def reuse_weight_casts(model: nn.Module) -> Iterator[None]:
    """Within the block, training forwards of ``model``'s experts reuse one low-precision cast of
    their weights; on exit the casts are dropped.

    For the micro-batches of one gradient-accumulation step: no optimizer step runs between them,
    so the E x D x F x 2 weights are cast once per step instead of once per micro-batch.
    Gradients are unchanged (the same bf16 values reach the GEMMs). Do not update the weights
    inside the block.
    """
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    for m in experts:
        m._reuse_in_training = True
    try:
        yield
    finally:
        for m in experts:
            m._reuse_in_training = False
            m._cast_cache = None


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype expert GEMMs run in: the autocast dtype when autocast is on, else ``x.dtype``."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class _CachedCast(torch.autograd.Function):
    """Forward: an already cast copy of a parameter. Backward: the gradient in its dtype."""

    @staticmethod
    def forward(ctx, param: Tensor, low: Tensor) -> Tensor:
        ctx.param_dtype = param.dtype
        return low.view_as(low)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad.to(ctx.param_dtype), None
