"""PatchMerger (Renggli et al., arXiv 2202.12015): N tokens -> N_out learned mixtures.

Shape legend: B batch, N input tokens, M output tokens, D width.

``Y = softmax_N(W LN(X)^T) LN(X)``: each of the M learned queries takes a convex combination of
the input tokens, so every later block (MoE layers included) sees M tokens instead of N.
Two details are unverified against the paper and exposed as options: whether the mixture is of the
normalised tokens (``merge_source="normed"``, default) or the raw ones (``"raw"``), and whether
the logits are scaled by ``D^-0.5`` (``logit_scale="rsqrt_d"``) or not (``None``, default).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

MERGE_SOURCES = ("normed", "raw")
LOGIT_SCALES = (None, "rsqrt_d")


class PatchMerger(nn.Module):
    def __init__(
        self,
        dim: int,
        num_tokens_out: int,
        ln_eps: float = 1e-6,
        merge_source: str = "normed",
        logit_scale: str | None = None,
    ):
        super().__init__()
        if merge_source not in MERGE_SOURCES:
            raise ValueError(f"merge_source must be one of {MERGE_SOURCES}, got {merge_source!r}")
        if logit_scale not in LOGIT_SCALES:
            raise ValueError(f"logit_scale must be one of {LOGIT_SCALES}, got {logit_scale!r}")
        if num_tokens_out < 1:
            raise ValueError(f"patch merger output tokens must be >= 1, got {num_tokens_out}")
        self.norm = nn.LayerNorm(dim, eps=ln_eps)
        self.queries = nn.Parameter(torch.empty(num_tokens_out, dim))
        nn.init.normal_(self.queries, std=1.0 / math.sqrt(dim))
        self.merge_source = merge_source
        self.scale = dim**-0.5 if logit_scale == "rsqrt_d" else 1.0

    def forward(self, x_BND: Tensor) -> Tensor:
        z_BND = self.norm(x_BND)
        logits_BMN = torch.einsum("md,bnd->bmn", self.queries.to(z_BND.dtype), z_BND) * self.scale
        attn_BMN = torch.softmax(logits_BMN.float(), dim=-1).to(z_BND.dtype)
        source = z_BND if self.merge_source == "normed" else x_BND
        return torch.einsum("bmn,bnd->bmd", attn_BMN, source)
