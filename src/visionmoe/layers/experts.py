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
        outs = []
        for e, chunk in enumerate(torch.split(x_ND, counts)):
            if chunk.shape[0] == 0:
                continue
            h = torch.addmm(self.b1[e].to(chunk.dtype), chunk, self.w1[e].to(chunk.dtype))
            h = self.drop(gelu(h, self.gelu_variant))
            outs.append(torch.addmm(self.b2[e].to(chunk.dtype), h, self.w2[e].to(chunk.dtype)))
        if not outs:
            return x_ND.new_zeros(0, x_ND.shape[-1])
        return self.drop(torch.cat(outs))
