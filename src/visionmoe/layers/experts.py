"""A bank of E expert MLPs with stacked weights.

Shape legend: E experts, C rows per expert buffer, N rows total, D width, F hidden width.
Weights are stored stacked, ``w1 (E, D, F)``, ``w2 (E, F, D)``, which matches the vmoe parameter
layout (``Moe/Mlp/Dense_0/kernel (E, D, M)``) and lets one batched matmul run all experts on
fixed-size buffers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

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

    def forward(self, x_ECD: Tensor) -> Tensor:
        """All experts on fixed-size buffers: one batched matmul per layer."""
        h_ECF = torch.baddbmm(self.b1.unsqueeze(1).to(x_ECD.dtype), x_ECD, self.w1.to(x_ECD.dtype))
        h_ECF = self.drop(gelu(h_ECF, self.gelu_variant))
        out = torch.baddbmm(self.b2.unsqueeze(1).to(x_ECD.dtype), h_ECF, self.w2.to(x_ECD.dtype))
        return self.drop(out)

    def forward_chunks(self, x_ND: Tensor, counts: list[int]) -> Tensor:
        """Rows sorted by expert, ``counts[e]`` rows for expert e: one GEMM per non-empty expert."""
        device = x_ND.device.type
        autocast = torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device) if autocast else x_ND.dtype
        x_ND = x_ND.to(dtype)
        w1, b1, w2, b2 = (p.to(dtype) for p in (self.w1, self.b1, self.w2, self.b2))
        if self.drop.p == 0 or not self.training:
            with torch.autocast(device_type=device, enabled=False):
                return _GroupedMlp.apply(x_ND, w1, b1, w2, b2, counts, self.gelu_variant)
        outs = []
        # unbind, not w[e]: the backward of E selects would zero-fill E full-size gradients.
        w1s, b1s, w2s, b2s = (p.unbind(0) for p in (w1, b1, w2, b2))
        for e, chunk in enumerate(torch.split(x_ND, counts)):
            if chunk.shape[0]:
                h = self.drop(gelu(torch.addmm(b1s[e], chunk, w1s[e]), self.gelu_variant))
                outs.append(torch.addmm(b2s[e], h, w2s[e]))
        return self.drop(torch.cat(outs)) if outs else x_ND.new_zeros(0, x_ND.shape[-1])


def _gelu_mode(variant: str) -> str:
    return "tanh" if variant == "tanh" else "none"


class _GroupedMlp(torch.autograd.Function):
    """Per-expert MLPs on expert-sorted rows, written into preallocated outputs.

    Autograd through E separate GEMMs would concatenate outputs and zero-fill or stack E
    full-size weight gradients; here each expert's results land directly in slices of one output
    and one gradient tensor per weight. Saved activations match a dense MLP's (input, GELU
    input and output).
    """

    @staticmethod
    def forward(ctx, x_ND, w1_EDF, b1_EF, w2_EFD, b2_ED, counts, variant):
        N, F_ = x_ND.shape[0], w1_EDF.shape[-1]
        mode = _gelu_mode(variant)
        pre_NF = x_ND.new_empty(N, F_)
        act_NF = x_ND.new_empty(N, F_)
        out_ND = x_ND.new_empty(N, w2_EFD.shape[-1])
        start = 0
        for e, count in enumerate(counts):
            if count:
                rows = slice(start, start + count)
                torch.addmm(b1_EF[e], x_ND[rows], w1_EDF[e], out=pre_NF[rows])
                act = torch.nn.functional.gelu(pre_NF[rows], approximate=mode, out=act_NF[rows])
                torch.addmm(b2_ED[e], act, w2_EFD[e], out=out_ND[rows])
                start += count
        ctx.save_for_backward(x_ND, w1_EDF, w2_EFD, pre_NF, act_NF)
        ctx.counts, ctx.mode = counts, mode
        return out_ND

    @staticmethod
    def backward(ctx, grad_ND):
        x_ND, w1_EDF, w2_EFD, pre_NF, act_NF = ctx.saved_tensors
        grad_ND = grad_ND.contiguous()
        # Every row is written below; only experts that received no rows need zero gradients.
        gx = torch.empty_like(x_ND) if ctx.needs_input_grad[0] else None
        gw1, gw2 = torch.empty_like(w1_EDF), torch.empty_like(w2_EFD)
        gb1 = w1_EDF.new_empty(w1_EDF.shape[0], w1_EDF.shape[2])
        gb2 = w2_EFD.new_empty(w2_EFD.shape[0], w2_EFD.shape[2])
        start = 0
        for e, count in enumerate(ctx.counts):
            if not count:
                for grad in (gw1, gw2, gb1, gb2):
                    grad[e].zero_()
                continue
            rows = slice(start, start + count)
            start += count
            g = grad_ND[rows]
            pre = pre_NF[rows]
            torch.mm(act_NF[rows].t(), g, out=gw2[e])
            torch.sum(g, dim=0, out=gb2[e])
            g_pre = torch.ops.aten.gelu_backward(g @ w2_EFD[e].t(), pre, approximate=ctx.mode)
            torch.mm(x_ND[rows].t(), g_pre, out=gw1[e])
            torch.sum(g_pre, dim=0, out=gb1[e])
            if gx is not None:
                torch.mm(g_pre, w1_EDF[e].t(), out=gx[rows])
        return gx, gw1, gb1, gw2, gb2, None, None
