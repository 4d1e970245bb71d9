"""The dense transformer MLP and the activation choices shared with the experts."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

GELU_VARIANTS = ("tanh", "exact")


def gelu(x: Tensor, variant: str) -> Tensor:
    """GELU; the JAX ViT/V-MoE code uses the tanh approximation, so parity needs ``"tanh"``."""
    return F.gelu(x, approximate="tanh" if variant == "tanh" else "none")


def init_dense_(linear: nn.Linear) -> nn.Linear:
    """ViT MLP init: Xavier-uniform kernel, N(0, 1e-6) bias."""
    nn.init.xavier_uniform_(linear.weight)
    nn.init.normal_(linear.bias, std=1e-6)
    return linear


class Mlp(nn.Module):
    """``Linear(D->F) -> GELU -> Dropout -> Linear(F->D) -> Dropout``."""

    def __init__(self, dim: int, hidden_dim: int, gelu_variant: str = "tanh", dropout: float = 0.0):
        super().__init__()
        if gelu_variant not in GELU_VARIANTS:
            raise ValueError(f"gelu_variant must be one of {GELU_VARIANTS}, got {gelu_variant!r}")
        self.fc1 = init_dense_(nn.Linear(dim, hidden_dim))
        self.fc2 = init_dense_(nn.Linear(hidden_dim, dim))
        self.gelu_variant = gelu_variant
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(gelu(self.fc1(x), self.gelu_variant))))
