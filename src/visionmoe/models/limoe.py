"""LIMoE (arXiv 2206.02770): one sparse encoder shared by images and text, trained contrastively.

Shape legend: B batch (images or texts), L tokens per sequence (Li patches, Lt text positions),
T tokens routed by one MoE call (image tokens + non-pad text tokens), D width, E experts,
J joint embedding width (``TextConfig.embed_dim``).

- One tower: patch embedding, image position embedding, blocks and final norm are those of an
  inner :class:`VisionTransformer` (``num_classes=0``, GAP); text only adds a token embedding and
  a learned position embedding. Modality-specific parts are the input embeddings and the pooling +
  linear projection into the joint space.
- Images and texts are separate sequences (no cross-modal attention): attention runs per modality
  (text with a key-padding mask), but each MoE block routes the tokens of *both* modalities in one
  call, so routing groups mix modalities and compete for the same expert capacity.
- Pad tokens are removed before the MoE call and get a zero MoE output (the residual carries them
  through): they take no capacity and are excluded from losses, metrics and pooling, and no real
  token attends to them. Their own states are computed but never read.
- Groups: ``moe.group_images=None`` routes the whole mixed batch as one group; ``g`` routes groups
  of g image-text pairs (images and texts with the same g consecutive indices), one router call
  each. Token-count groups (``moe.group_size``) are refused: text lengths vary, so a fixed token
  count would cut pairs apart. ``TextConfig.separate_modality_capacity`` splits every group into
  its image and its text tokens, each routed with its own capacity.
- Loss: symmetric InfoNCE (:func:`visionmoe.models.limoe_aux.contrastive_loss`) plus, per MoE
  block, the per-modality local and global entropy losses (:mod:`visionmoe.routing.entropy`),
  plus the V-MoE importance / load losses of the mixed pool when ``keep_classic_losses``.
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from dataclasses import dataclass, fields, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionmoe.layers.attention import Attention
from visionmoe.layers.dispatch import dispatch
from visionmoe.layers.moe import MoEAux, SparseMoE
from visionmoe.models.config import ViTConfig
from visionmoe.models.field_types import check_field_types
from visionmoe.models.limoe_aux import LIMoEAux, LIMoELayerAux, modality_metrics
from visionmoe.models.vit import VisionTransformer
from visionmoe.routing.entropy import global_entropy_loss, local_entropy_loss
from visionmoe.routing.plan import LazyMetrics, concat_plans, lazy_routing_metrics

PAD_ID = 0  # the pad id of visionmoe.data.text.Tokenizer
MODALITIES = ("image", "text")
MAX_LOGIT_SCALE = 100.0  # CLIP's cap on 1/temperature: keeps the softmax from saturating


@dataclass(kw_only=True, frozen=True)
class TextConfig:
    """The text side of LIMoE and its loss weights ([U]: unverified paper defaults).

    ``temperature_init`` is the initial softmax temperature t of the contrastive logits (learned
    as ``log_scale = log(1 / t)``). ``tau_*`` is the global-entropy threshold per modality:
    ``None`` means the unthresholded ``-Ent(p_bar)``, a float tau means ``max(0, tau - Ent)``
    (see :func:`global_entropy_loss`); spec defaults tau_text = log(8), image unthresholded.
    ``keep_classic_losses`` also adds the router's V-MoE importance / load losses.
    ``separate_modality_capacity`` [U: whether the paper used it] routes the image tokens and the
    text tokens of each group in separate calls with separate capacity buffers, so priorities
    (BPR) never compare an image token with a text token; default ``False``: one mixed pool.
    """

    vocab_size: int = 512
    max_len: int = 16
    embed_dim: int = 64
    temperature_init: float = 0.1
    image_local_weight: float = 0.01
    image_global_weight: float = 0.01
    text_local_weight: float = 0.01
    text_global_weight: float = 0.01
    tau_image: float | None = None
    tau_text: float | None = math.log(8)
    keep_classic_losses: bool = True
    separate_modality_capacity: bool = False

    def __post_init__(self) -> None:
        check_field_types(self, "text.")
        for name, low in (("vocab_size", 2), ("max_len", 1), ("embed_dim", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"text.{name} must be an integer >= {low}, got {value!r}")
        t = self.temperature_init
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ValueError(f"text.temperature_init must be a number > 0, got {t!r}")
        for name in (
            "image_local_weight",
            "image_global_weight",
            "text_local_weight",
            "text_global_weight",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"text.{name} must be a number >= 0, got {value!r}")
        for name in ("keep_classic_losses", "separate_modality_capacity"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"text.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("tau_image", "tau_text"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0
            ):
                raise ValueError(f"text.{name} must be a number >= 0 or None, got {value!r}")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def masked_attention(attn: Attention, x_BLD: Tensor, mask_BL: Tensor) -> Tensor:
    """``attn`` (same weights) where no query reads a key with ``mask_BL == False`` (pads)."""
    B, L, D = x_BLD.shape
    qkv = attn.qkv(x_BLD).reshape(B, L, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    drop = attn.attn_dropout if attn.training else 0.0
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask_BL[:, None, None, :], dropout_p=drop
    )
    return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(B, L, D)))


class LIMoE(nn.Module):
    """Multimodal contrastive MoE: ``forward(images, tokens) -> (B, B)`` similarity logits.

    API: ``encode_image(x_BCHW)`` / ``encode_text(tokens_BL)`` -> L2-normalised (B, J)
    embeddings (each routes one modality alone); ``forward(images, tokens, return_aux=False)``
    routes both together and returns ``exp(log_scale) * u v^T`` (and a :class:`LIMoEAux`);
    ``forward_features`` / ``forward_head(pre_logits=True)`` give image features like a ViT (for
    few-shot probes). ``last_aux`` holds the latest forward's :class:`LIMoEAux`.
    """

    def __init__(self, vit_config: ViTConfig, text_config: TextConfig):
        super().__init__()
        moe = vit_config.moe
        if moe is not None and vit_config.moe_layers:
            if moe.router not in ("top_k", "expert_choice"):
                raise ValueError(
                    f"LIMoE needs a sparse router ('top_k' or 'expert_choice'), got {moe.router!r}"
                )
            if moe.group_size is not None:
                raise ValueError(
                    f"LIMoE routes groups of image-text pairs; got moe.group_size="
                    f"{moe.group_size}: use group_images (None = the whole batch) instead"
                )
        self.config = replace(vit_config, num_classes=0, classifier="gap", representation_size=None)
        self.text_config = text_config
        self.vit = VisionTransformer(self.config)
        d, tc = self.config.hidden_size, text_config
        self.token_embed = nn.Embedding(tc.vocab_size, d)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        self.text_pos_embed = nn.Parameter(torch.empty(1, tc.max_len, d))
        nn.init.normal_(self.text_pos_embed, std=0.02)
        self.image_proj = nn.Linear(d, tc.embed_dim, bias=False)
        self.text_proj = nn.Linear(d, tc.embed_dim, bias=False)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / tc.temperature_init)))
        self.last_aux: LIMoEAux | None = None

    @property
    def blocks(self) -> nn.ModuleList:
        return self.vit.blocks

    @property
    def patch_embed(self) -> nn.Module:
        return self.vit.patch_embed

    @property
    def num_prefix(self) -> int:
        return 0

    @property
    def moe_blocks(self) -> dict[int, nn.Module]:
        return self.vit.moe_blocks

    @property
    def logit_scale(self) -> Tensor:
        """``1 / temperature``, capped at ``MAX_LOGIT_SCALE``."""
        return self.log_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def text_mask(self, tokens_BL: Tensor) -> Tensor:
        """(B, L) True on real tokens; checks what would otherwise fail deep inside."""
        if tokens_BL.ndim != 2 or tokens_BL.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"expected integer tokens of shape (B, L), got {tokens_BL.dtype} "
                f"{tuple(tokens_BL.shape)}"
            )
        tc = self.text_config
        if tokens_BL.shape[1] > tc.max_len:
            raise ValueError(f"text length {tokens_BL.shape[1]} exceeds max_len={tc.max_len}")
        if tokens_BL.numel() and (tokens_BL.min() < 0 or tokens_BL.max() >= tc.vocab_size):
            raise ValueError(f"token ids must lie in [0, {tc.vocab_size}) (vocab_size)")
        mask_BL = tokens_BL != PAD_ID
        if not bool(mask_BL.any(dim=1).all()):
            raise ValueError("every text needs at least one non-pad token")
        return mask_BL

    def _encode(
        self, images: Tensor | None, tokens: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, LIMoEAux]:
        """Final-norm tokens of each given modality (both go through the blocks in lockstep),
        the text mask and the live aux; ``last_aux`` keeps a detached copy."""
        vit = self.vit
        x_img = x_txt = mask = None
        if images is not None:
            x_img = vit.patch_embed(images)
            x_img = x_img + vit.pos_embed.to(x_img.dtype)
        if tokens is not None:
            mask = self.text_mask(tokens)
            x_txt = self.token_embed(tokens) + self.text_pos_embed[:, : tokens.shape[1]]
        layers: dict[int, LIMoELayerAux] = {}
        for i, block in enumerate(vit.blocks):
            h_img = h_txt = None
            if x_img is not None:
                x_img = x_img + block.attn(block.norm1(x_img))
                h_img = block.norm2(x_img)
            if x_txt is not None:
                x_txt = x_txt + masked_attention(block.attn, block.norm1(x_txt), mask)
                h_txt = block.norm2(x_txt)
            if block.is_moe:
                y_img, y_txt, layers[i] = self._mixed_moe(block.ffn, h_img, h_txt, mask)
            else:
                y_img = block.ffn(h_img) if h_img is not None else None
                y_txt = block.ffn(h_txt) if h_txt is not None else None
            x_img = x_img + y_img if x_img is not None else None
            x_txt = x_txt + y_txt if x_txt is not None else None
        ref = x_img if x_img is not None else x_txt
        loss = sum((a.loss for a in layers.values()), ref.new_zeros((), dtype=torch.float32))
        aux = LIMoEAux(loss, layers)
        self.last_aux = aux.detached()
        return (
            vit.norm(x_img) if x_img is not None else None,
            vit.norm(x_txt) if x_txt is not None else None,
            mask,
            aux,
        )

    def _mixed_moe(
        self, moe: SparseMoE, h_img: Tensor | None, h_txt: Tensor | None, mask_BL: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, LIMoELayerAux]:
        """Route image tokens and non-pad text tokens together, group by group of pairs (or each
        modality of a group on its own, with ``separate_modality_capacity``)."""
        xs, seqs, text = [], [], []
        if h_img is not None:
            B, L, D = h_img.shape
            xs.append(h_img.reshape(B * L, D))
            seqs.append(torch.arange(B, device=h_img.device).repeat_interleave(L))
            text.append(torch.zeros(B * L, dtype=torch.bool, device=h_img.device))
        if h_txt is not None:
            Lt = h_txt.shape[1]
            real = mask_BL.reshape(-1).nonzero().squeeze(1)
            xs.append(h_txt.reshape(-1, h_txt.shape[-1]).index_select(0, real))
            seqs.append(real // Lt)
            text.append(torch.ones(len(real), dtype=torch.bool, device=h_txt.device))
        x_TD, seq_T, is_text_T = torch.cat(xs), torch.cat(seqs), torch.cat(text)
        per_group = self.config.moe.group_images
        group_T = torch.zeros_like(seq_T) if per_group is None else seq_T // per_group
        if self.text_config.separate_modality_capacity:
            # Each group splits into its image part and its text part, routed (and given
            # capacity) separately: text can no longer lose its slots to image tokens.
            group_T = 2 * group_T + is_text_T.long()
        # Stable: within a group the concatenation order (images, then text) is kept.
        order_T = torch.sort(group_T, stable=True).indices
        x_TD, is_text_T = x_TD.index_select(0, order_T), is_text_T.index_select(0, order_T)
        counts = torch.bincount(group_T).tolist()
        plans, gates, aux = [], [], []
        losses: dict[str, dict[str, list[Tensor]]] = {
            m: {"local": [], "global": []} for m in MODALITIES
        }
        start = 0
        for n in counts:
            if n == 0:
                continue
            plan_g, gates_g = moe.router(x_TD[start : start + n], None)
            plans.append(plan_g)
            gates.append(gates_g)
            aux.append(plan_g.aux_loss)
            for modality, mask_g in zip(
                MODALITIES,
                (~is_text_T[start : start + n], is_text_T[start : start + n]),
                strict=True,
            ):
                if bool(mask_g.any()):
                    tau = getattr(self.text_config, f"tau_{modality}")
                    losses[modality]["local"].append(local_entropy_loss(gates_g, mask_g))
                    losses[modality]["global"].append(global_entropy_loss(gates_g, mask_g, tau))
            start += n
        plan = concat_plans(plans)
        gates_TE = torch.cat(gates)
        if len(plans) > 1:
            plan.aux_loss = torch.stack(aux).mean()
            plan.metrics = lazy_routing_metrics(plan, gates_TE)
        y_sorted = dispatch(x_TD, plan, moe.experts, moe.dispatch)
        y_TD = torch.zeros_like(y_sorted).index_copy(0, order_T, y_sorted)
        tc = self.text_config
        loss = plan.aux_loss if tc.keep_classic_losses else gates_TE.new_zeros(())
        modality_out: dict[str, MutableMapping[str, Tensor]] = {}
        plan_kept, gates_kept = plan.detached(), gates_TE.detach()  # no graph in the metrics
        for modality, mask_T in zip(MODALITIES, (~is_text_T, is_text_T), strict=True):
            if not losses[modality]["local"]:
                continue
            local = torch.stack(losses[modality]["local"]).mean()
            glob = torch.stack(losses[modality]["global"]).mean()
            loss = loss + getattr(tc, f"{modality}_local_weight") * local
            loss = loss + getattr(tc, f"{modality}_global_weight") * glob
            # Computed when first read: training logs them every few steps only.
            stats = LazyMetrics(partial(modality_metrics, plan_kept, gates_kept, mask_T))
            stats.update(local_entropy_loss=local.detach(), global_entropy_loss=glob.detach())
            modality_out[modality] = stats
        y_img = y_txt = None
        num_img = 0
        if h_img is not None:
            num_img = h_img.shape[0] * h_img.shape[1]
            y_img = y_TD[:num_img].view(h_img.shape)
        if h_txt is not None:
            flat = y_TD.new_zeros(h_txt.shape[0] * h_txt.shape[1], h_txt.shape[2])
            y_txt = flat.index_copy(0, real, y_TD[num_img:]).view(h_txt.shape)
        layer = LIMoELayerAux(loss, MoEAux(plan.aux_loss, plan.metrics, plan, gates_TE), is_text_T)
        layer.modality = modality_out
        return y_img, y_txt, layer

    def forward_features(self, x_BCHW: Tensor) -> Tensor:
        """(B, Li, D) image tokens after the final norm (routing images alone)."""
        return self._encode(x_BCHW, None)[0]

    def forward_head(self, x_BLD: Tensor, pre_logits: bool = False) -> Tensor:
        """GAP image features (``pre_logits``) or their normalised joint embedding."""
        pooled = x_BLD.mean(dim=1)
        return pooled if pre_logits else F.normalize(self.image_proj(pooled), dim=-1)

    def _embed_text(self, x_BLD: Tensor, mask_BL: Tensor) -> Tensor:
        weights = mask_BL.to(x_BLD.dtype).unsqueeze(-1)
        pooled = (x_BLD * weights).sum(dim=1) / weights.sum(dim=1)
        return F.normalize(self.text_proj(pooled), dim=-1)

    def encode_image(self, x_BCHW: Tensor) -> Tensor:
        """(B, J) L2-normalised image embeddings."""
        return self.forward_head(self.forward_features(x_BCHW))

    def encode_text(self, tokens_BL: Tensor) -> Tensor:
        """(B, J) L2-normalised text embeddings (mean over non-pad tokens)."""
        _, x_txt, mask, _ = self._encode(None, tokens_BL)
        return self._embed_text(x_txt, mask)

    def forward(self, images: Tensor, tokens: Tensor | None = None, return_aux: bool = False):
        if tokens is None:
            raise ValueError(
                "LIMoE is a contrastive image-text model: call forward(images, tokens), or "
                "encode_image(images) for image embeddings (zero-shot: `visionmoe zeroshot RUN`)"
            )
        x_img, x_txt, mask, aux = self._encode(images, tokens)
        u, v = self.forward_head(x_img), self._embed_text(x_txt, mask)
        logits = self.logit_scale * u @ v.T
        return (logits, aux) if return_aux else logits
