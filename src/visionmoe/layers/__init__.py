"""Transformer building blocks and MoE layers."""

from visionmoe.layers.attention import Attention
from visionmoe.layers.dispatch import dispatch, einsum_dispatch
from visionmoe.layers.experts import Experts
from visionmoe.layers.mlp import Mlp
from visionmoe.layers.moe import MoEAux, SoftMoE, SparseMoE
from visionmoe.layers.patch_embed import PatchEmbed

__all__ = [
    "Attention",
    "Experts",
    "Mlp",
    "MoEAux",
    "PatchEmbed",
    "SoftMoE",
    "SparseMoE",
    "dispatch",
    "einsum_dispatch",
]
