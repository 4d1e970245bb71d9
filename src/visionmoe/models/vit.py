"""One Vision Transformer for dense and MoE models.

Shape legend: B batch, C channels, H/W image size, N tokens, D width.

A block's FFN is a dense :class:`Mlp` or an MoE layer, chosen by ``config.moe_layers`` (explicit
0-indexed block ids). Blocks return ``(x, aux)``; the model sums the auxiliary losses in one place
(:meth:`VisionTransformer.forward_features`) and keeps the last forward's :class:`ModelAux` in
``model.last_aux``, so training code reads the loss and routing metrics without a second pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from visionmoe.layers.attention import Attention
from visionmoe.layers.mlp import Mlp
from visionmoe.layers.moe import MoEAux, SoftMoE, SparseMoE
from visionmoe.layers.patch_embed import PatchEmbed, sincos_2d
from visionmoe.layers.patch_merger import PatchMerger
from visionmoe.models.config import ViTConfig


@dataclass
class ModelAux:
    """Auxiliary outputs of one forward: summed aux loss and per-MoE-block results."""

    loss: Tensor
    layers: dict[int, MoEAux] = field(default_factory=dict)

    def detached(self) -> ModelAux:
        """A copy holding no autograd graph (what ``model.last_aux`` keeps)."""
        return ModelAux(self.loss.detach(), {i: a.detached() for i, a in self.layers.items()})

    def metric_tensors(self, prefix: str = "moe") -> dict[str, Tensor]:
        """Scalar metrics as 0-dim tensors on their device, ``moe/layer<i>/<name>``."""
        out = {}
        for index, aux in self.layers.items():
            for name, value in aux.metrics.items():
                if value.numel() == 1:
                    out[f"{prefix}/layer{index}/{name}"] = value.detach().reshape(())
        return out

    def metrics(self, prefix: str = "moe") -> dict[str, float]:
        """Scalar metrics as plain floats named ``moe/layer<i>/<name>`` (vectors skipped)."""
        return {k: float(v) for k, v in self.metric_tensors(prefix).items()}


def build_ffn(config: ViTConfig, index: int) -> nn.Module:
    """The FFN of block ``index``: dense MLP, or the configured MoE layer."""
    # Widened blocks (dense twins, models upcycled from them) get wide experts too.
    d, f = config.hidden_size, config.mlp_dim_at_block(index)
    moe = config.moe
    if index not in config.moe_layers or moe is None:
        return Mlp(d, f, config.gelu, config.dropout)
    tokens = config.tokens_at_block(index)
    if moe.group_size is not None:
        group_size = moe.group_size
    elif moe.group_images is not None:
        group_size = moe.group_images * tokens
    else:
        group_size = None
    if moe.router == "soft":
        if group_size is None:
            raise ValueError(
                "router='soft' mixes groups of a fixed size: set moe.group_size (tokens) or "
                "moe.group_images (images), not both None"
            )
        return SoftMoE(
            d,
            f,
            moe.num_experts,
            moe.slots_per_expert,
            tokens,
            moe.capacity_factor,
            moe.noise_std,
            config.gelu,
            moe.expert_dropout,
            moe.expert_init,
            group_size=group_size,
            bf16_dispatch=moe.bf16_dispatch,
        )
    router_kwargs = {
        "noise_std": moe.noise_std,
        "capacity_rounding": moe.capacity_rounding,
        "capacity_multiple_of": moe.capacity_multiple_of,
    }
    if moe.router == "top_k":
        router_kwargs.update(
            bpr_score=moe.bpr_score,
            renormalize=moe.renormalize,
            importance_weight=moe.importance_weight,
            load_weight=moe.load_weight,
            gshard_weight=moe.gshard_weight,
            z_loss_weight=moe.z_loss_weight,
        )
    common = dict(
        dim=d, hidden_dim=f, num_experts=moe.num_experts, top_k=moe.top_k,
        capacity_factor=moe.capacity_factor, group_size=group_size,
        batch_priority=moe.batch_priority, eval_capacity_factor=moe.eval_capacity_factor,
        dispatch=moe.dispatch, gelu_variant=config.gelu, dropout=moe.expert_dropout,
        expert_init=moe.expert_init, **router_kwargs,
    )  # fmt: skip
    if moe.ensemble_members > 1:
        from visionmoe.models.ensemble import EnsembleSparseMoE

        return EnsembleSparseMoE(num_members=moe.ensemble_members, **common)
    return SparseMoE(router=moe.router, **common)


class Block(nn.Module):
    """Pre-LN transformer block: ``x + MHA(LN(x))`` then ``x + FFN(LN(x))``."""

    def __init__(self, config: ViTConfig, ffn: nn.Module):
        super().__init__()
        d, eps = config.hidden_size, config.ln_eps
        self.norm1 = nn.LayerNorm(d, eps=eps)
        self.attn = Attention(
            d, config.num_heads, config.qk_norm, eps, config.attn_dropout, config.dropout
        )
        self.norm2 = nn.LayerNorm(d, eps=eps)
        self.ffn = ffn
        self.is_moe = isinstance(ffn, (SparseMoE, SoftMoE))
        # Activation checkpointing: keep only the block input in training and recompute the rest
        # in the backward pass (same random draws: the RNG state is replayed).
        self.remat = False

    def forward(self, x: Tensor) -> tuple[Tensor, MoEAux | None]:
        if self.remat and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: Tensor) -> tuple[Tensor, MoEAux | None]:
        x = x + self.attn(self.norm1(x))
        if self.is_moe:
            y, aux = self.ffn(self.norm2(x))
            return x + y, aux
        return x + self.ffn(self.norm2(x)), None


class MapHead(nn.Module):
    """Multi-head attention pooling with one learned probe, then a residual MLP."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        d = config.hidden_size
        self.probe = nn.Parameter(torch.empty(1, 1, d))
        nn.init.xavier_uniform_(self.probe.view(1, d))
        self.attn = nn.MultiheadAttention(d, config.num_heads, batch_first=True)
        self.norm = nn.LayerNorm(d, eps=config.ln_eps)
        self.mlp = Mlp(d, config.mlp_dim, config.gelu)

    def forward(self, x_BND: Tensor) -> Tensor:
        probe = self.probe.expand(x_BND.shape[0], -1, -1).to(x_BND.dtype)
        pooled = self.attn(probe, x_BND, x_BND, need_weights=False)[0]
        return (pooled + self.mlp(self.norm(pooled)))[:, 0]


class VisionTransformer(nn.Module):
    """ViT with MoE FFNs at ``config.moe_layers``.

    API: ``forward_features(x) -> (B, N, D)`` tokens after the final norm; ``forward_head(tokens,
    pre_logits=False)`` pools and classifies; ``forward(x, return_aux=False)`` returns logits, or
    ``(logits, ModelAux)`` with ``return_aux=True``. ``model.last_aux`` always holds the
    :class:`ModelAux` of the latest forward (aux loss summed over MoE blocks, each already the
    mean over its routing groups, plus per-block metrics and routing plans), detached: it does
    not keep the forward's autograd graph alive; the ``aux`` returned with ``return_aux=True``
    carries the gradient.
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.patch_embed = PatchEmbed(config.image_size, config.patch_size, config.in_chans, d)
        self.num_prefix = 1 if config.classifier == "token" else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if self.num_prefix else None
        num_patches = self.patch_embed.num_patches
        if config.posemb == "learn":
            self.pos_embed = nn.Parameter(torch.empty(1, num_patches + self.num_prefix, d))
            nn.init.normal_(self.pos_embed, std=0.02)
        else:
            fixed = sincos_2d(self.patch_embed.grid_size, d).unsqueeze(0)
            # The class token gets no position embedding.
            fixed = torch.cat([torch.zeros(1, self.num_prefix, d), fixed], dim=1)
            self.register_buffer("pos_embed", fixed, persistent=False)
        self.blocks = nn.ModuleList(
            Block(config, build_ffn(config, i)) for i in range(config.num_layers)
        )
        self.patch_merger = None
        if config.patch_merger_after is not None:
            self.patch_merger = PatchMerger(
                d,
                config.patch_merger_tokens,
                config.ln_eps,
                config.patch_merger_source,
                config.patch_merger_scale,
            )
        self.tile_at = min(config.moe_layers) if config.ensemble_members > 1 else None
        self.norm = nn.LayerNorm(d, eps=config.ln_eps)
        self.map_head = MapHead(config) if config.classifier == "map" else None
        width = d
        self.pre_logits = None
        if config.representation_size is not None:
            self.pre_logits = nn.Sequential(nn.Linear(d, config.representation_size), nn.Tanh())
            width = config.representation_size
        self.head = nn.Linear(width, config.num_classes) if config.num_classes else nn.Identity()
        if config.num_classes:
            nn.init.zeros_(self.head.weight)
            bias = config.head_bias_init
            nn.init.constant_(
                self.head.bias, -math.log(config.num_classes) if bias is None else bias
            )
        self.last_aux: ModelAux | None = None

    @property
    def moe_blocks(self) -> dict[int, nn.Module]:
        """Block index -> MoE layer."""
        return {i: b.ffn for i, b in enumerate(self.blocks) if b.is_moe}

    def forward_features(self, x_BCHW: Tensor) -> Tensor:
        return self._features(x_BCHW)[0]

    def _features(self, x_BCHW: Tensor) -> tuple[Tensor, ModelAux]:
        """Final-norm tokens and the live (differentiable) aux of this forward."""
        x = self.patch_embed(x_BCHW)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = x + self.pos_embed.to(x.dtype)
        layers: dict[int, MoEAux] = {}
        for i, block in enumerate(self.blocks):
            if i == self.tile_at:
                # E^3: member copies of an image are adjacent along the batch.
                x = x.repeat_interleave(self.config.ensemble_members, dim=0)
            x, aux = block(x)
            if aux is not None:
                layers[i] = aux
            if i == self.config.patch_merger_after:
                prefix, patches = x[:, : self.num_prefix], x[:, self.num_prefix :]
                x = torch.cat([prefix, self.patch_merger(patches)], dim=1)
        loss = sum((a.loss for a in layers.values()), x.new_zeros((), dtype=torch.float32))
        aux = ModelAux(loss, layers)
        self.last_aux = aux.detached()
        return self.norm(x), aux

    def forward_head(self, x_BND: Tensor, pre_logits: bool = False) -> Tensor:
        if self.config.classifier == "token":
            x = x_BND[:, 0]
        elif self.config.classifier == "gap":
            x = x_BND.mean(dim=1)
        else:
            x = self.map_head(x_BND)
        if self.pre_logits is not None:
            x = self.pre_logits(x)
        return x if pre_logits else self.head(x)

    def forward(self, x_BCHW: Tensor, return_aux: bool = False):
        """Logits ``(B, C)``; E^3 models return member logits ``(B, M, C)``."""
        tokens, aux = self._features(x_BCHW)
        logits = self.forward_head(tokens)
        members = self.config.ensemble_members
        if members > 1:
            logits = logits.view(-1, members, logits.shape[-1])
        return (logits, aux) if return_aux else logits
