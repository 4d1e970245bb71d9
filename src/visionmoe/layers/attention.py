"""Multi-head self-attention with optional QK-norm (used by the Soft MoE backbones)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class Attention(nn.Module):
    """Fused-QKV attention; queries are scaled by ``1/sqrt(D/h)`` inside SDPA.

    Shape legend: B batch, N tokens, D width, H heads, Dh = D / H.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qk_norm: bool = False,
        ln_eps: float = 1e-6,
        attn_dropout: float = 0.0,
        proj_dropout: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=ln_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=ln_eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.attn_dropout = attn_dropout
        self.proj_drop = nn.Dropout(proj_dropout)
        nn.init.xavier_uniform_(self.qkv.weight)
        nn.init.zeros_(self.qkv.bias)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x_BND: Tensor) -> Tensor:
        B, N, D = x_BND.shape
        qkv = self.qkv(x_BND).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, Dh)
        q, k = self.q_norm(q), self.k_norm(k)
        drop = self.attn_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, D)))
