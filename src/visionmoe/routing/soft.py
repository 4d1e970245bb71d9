"""Soft MoE routing (Puigcerver et al., arXiv 2308.00951).

Shape legend: B routing groups, M tokens per group, D width, N experts, P slots per expert. A
group is one image or, as in vmoe, ``group_size`` consecutive tokens spanning several images (the
layer cuts the groups, see ``layers/moe.py``).

Every slot takes a convex combination of all tokens of its group (dispatch: softmax over tokens)
and every token takes a convex combination of all slot outputs (combine: softmax over slots).
Logits are cosine similarities between tokens and learned slot vectors times a learned scale, so
the softmaxes do not saturate as D grows. Fully differentiable: the router gets its gradient
through both softmaxes; no capacity, no dropping, no auxiliary loss.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from visionmoe.routing.plan import router_precision


def l2_normalize(x: Tensor, dim: int = -1, eps: float = 1e-6) -> Tensor:
    """``x * rsqrt(sum(x^2) + eps)`` along ``dim``."""
    return x * torch.rsqrt(x.pow(2).sum(dim=dim, keepdim=True) + eps)


class SoftRouter(nn.Module):
    """Produces ``(dispatch_BMNP, combine_BMNP)`` weights for a Soft MoE layer.

    Args:
      dim: D.
      num_experts: N.
      slots_per_expert: P.
      noise_std: std of Gaussian noise added to the logits in training (default 0 = off).
    """

    def __init__(
        self, dim: int, num_experts: int, slots_per_expert: int = 1, noise_std: float = 0.0
    ):
        super().__init__()
        for name, value in (
            ("dim", dim),
            ("num_experts", num_experts),
            ("slots_per_expert", slots_per_expert),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(noise_std, bool) or not isinstance(noise_std, (int, float)):
            raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
        if not 0 <= noise_std < math.inf:
            raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
        self.num_experts = num_experts
        self.slots_per_expert = slots_per_expert
        self.noise_std = noise_std
        self.mu = nn.Parameter(torch.empty(dim, num_experts, slots_per_expert))
        self.scale = nn.Parameter(torch.ones(()))
        # LeCun normal with JAX's fan-in for a (D, N, P) kernel (N * D); only the optimisation
        # sees it, since the forward normalises every slot column.
        nn.init.normal_(self.mu, std=1.0 / math.sqrt(num_experts * dim))

    def forward(self, x_BMD: Tensor) -> tuple[Tensor, Tensor]:
        with torch.autocast(device_type=x_BMD.device.type, enabled=False):
            x_BMD = l2_normalize(router_precision(x_BMD))
            mu_DNP = l2_normalize(self.mu.to(x_BMD.dtype), dim=0)
            logits_BMNP = self.scale.to(x_BMD.dtype) * torch.einsum("bmd,dnp->bmnp", x_BMD, mu_DNP)
            if self.training and self.noise_std > 0:
                logits_BMNP = logits_BMNP + self.noise_std * torch.randn_like(logits_BMNP)
            B, M, N, P = logits_BMNP.shape
            dispatch_BMNP = torch.softmax(logits_BMNP, dim=1)
            combine_BMNP = torch.softmax(logits_BMNP.reshape(B, M, N * P), dim=-1).reshape(
                B, M, N, P
            )
        return dispatch_BMNP, combine_BMNP
