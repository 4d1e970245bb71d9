"""Typed model configs: the ViT backbone and its MoE layers.

Every field is validated in ``__post_init__`` so a bad value fails where it is written, with a
message naming it and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from visionmoe.layers.dispatch import DISPATCH_MODES
from visionmoe.layers.experts import EXPERT_INITS
from visionmoe.layers.mlp import GELU_VARIANTS
from visionmoe.layers.patch_merger import LOGIT_SCALES, MERGE_SOURCES
from visionmoe.models.field_types import check_field_types
from visionmoe.routing.capacity import ROUNDINGS
from visionmoe.routing.top_k import BPR_SCORES

MOE_ROUTERS = ("top_k", "expert_choice", "soft")
# What switching ``router`` to each router sets, unless the same call sets the field too:
# V-MoE: noise 1/E, 8 images per group, capacity ceil then a multiple of 4; Expert Choice: one
# image per group, capacity rounded to nearest, no multiple; Soft MoE: no noise, one image.
ROUTER_DEFAULTS: dict[str, dict] = {
    "top_k": dict(noise_std=1.0, group_images=8, capacity_rounding="ceil", capacity_multiple_of=4),
    "expert_choice": dict(
        noise_std=1.0, group_images=1, capacity_rounding="round", capacity_multiple_of=None
    ),
    "soft": dict(noise_std=0.0, group_images=1),
}
CLASSIFIERS = ("token", "gap", "map")
POSEMBS = ("learn", "sincos2d")


def _positive_int(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name} must be a positive integer{extra}, got {value!r}")


def _choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _positive_float(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")


@dataclass(kw_only=True, frozen=True)
class MoEConfig:
    """One config for the MoE layers of a model (all MoE blocks share it).

    Routing groups: ``group_size`` tokens if set, else ``group_images`` whole images (V-MoE: 8;
    Expert Choice / Soft MoE: 1); ``group_images=None`` routes the whole batch as one group
    (sparse routers only). Groups are cut from the row-major ``(B*L, D)`` tokens, so with every
    router a group may span several images (vmoe Soft MoE: ``group_size = k * L``).
    ``bf16_dispatch`` (Soft MoE only, default off) rounds the dispatched tokens and the expert
    outputs to bfloat16 as vmoe's Soft MoE router always does (float32 differs by ~1e-3).
    ``bpr_score="sum_topk"`` is an unverified alternative to the reference top-1 priority.
    """

    router: str = "top_k"
    num_experts: int = 8
    top_k: int = 2
    capacity_factor: float = 1.05
    eval_capacity_factor: float | None = None
    group_size: int | None = None
    group_images: int | None = 8
    noise_std: float = 1.0
    batch_priority: bool = False
    bpr_score: str = "max"
    renormalize: bool = False
    capacity_rounding: str = "ceil"
    capacity_multiple_of: int | None = 4
    importance_weight: float = 0.005
    load_weight: float = 0.005
    gshard_weight: float = 0.0
    z_loss_weight: float = 0.0
    slots_per_expert: int | None = 1
    expert_init: str = "shared"
    expert_dropout: float = 0.0
    dispatch: str = "auto"
    ensemble_members: int = 1
    bf16_dispatch: bool = False

    def __post_init__(self) -> None:
        check_field_types(self)
        _choice("router", self.router, MOE_ROUTERS)
        _positive_int("num_experts", self.num_experts)
        _positive_int("top_k", self.top_k)
        if self.router == "top_k" and self.top_k > self.num_experts:
            raise ValueError(
                f"top_k={self.top_k} exceeds num_experts={self.num_experts}; "
                f"top_k must be in [1, {self.num_experts}]"
            )
        _positive_float("capacity_factor", self.capacity_factor)
        _positive_float("eval_capacity_factor", self.eval_capacity_factor, allow_none=True)
        _positive_int("group_size", self.group_size, allow_none=True)
        _positive_int("group_images", self.group_images, allow_none=True)
        _positive_int("slots_per_expert", self.slots_per_expert, allow_none=True)
        _positive_int("capacity_multiple_of", self.capacity_multiple_of, allow_none=True)
        _choice("bpr_score", self.bpr_score, BPR_SCORES)
        _choice("capacity_rounding", self.capacity_rounding, ROUNDINGS)
        _choice("expert_init", self.expert_init, EXPERT_INITS)
        _choice("dispatch", self.dispatch, DISPATCH_MODES)
        _positive_int("ensemble_members", self.ensemble_members)
        if self.bf16_dispatch and self.router != "soft":
            raise ValueError(f"bf16_dispatch needs router='soft', got router={self.router!r}")
        if self.num_experts % self.ensemble_members:
            raise ValueError(
                f"num_experts={self.num_experts} must be divisible by "
                f"ensemble_members={self.ensemble_members} (experts are split among members)"
            )
        if self.ensemble_members > 1 and self.router != "top_k":
            raise ValueError(f"ensemble_members > 1 needs router='top_k', got {self.router!r}")
        if self.router == "top_k" and self.top_k > self.num_experts // self.ensemble_members:
            raise ValueError(
                f"top_k={self.top_k} exceeds the {self.num_experts // self.ensemble_members} "
                "experts of each ensemble member"
            )
        for name in (
            "noise_std",
            "importance_weight",
            "load_weight",
            "gshard_weight",
            "z_loss_weight",
            "expert_dropout",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")


@dataclass(kw_only=True, frozen=True)
class ViTConfig:
    """A Vision Transformer; blocks listed in ``moe_layers`` (0-indexed) get an MoE FFN.

    ``wide_mlp_layers`` / ``wide_mlp_factor`` widen the dense MLP of some blocks: the dense twin of
    a top-K MoE model (:func:`dense_twin`) has ``K * mlp_dim`` hidden units where the MoE was, so
    both spend the same FLOPs per token. ``gelu="tanh"`` and ``ln_eps=1e-6`` match the JAX ViT /
    V-MoE code. ``head_bias_init=None`` initialises the classifier bias to ``-log(num_classes)``.
    ``num_classes=0`` builds no head (the model returns pre-logits).
    """

    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    hidden_size: int = 768
    mlp_dim: int = 3072
    num_heads: int = 12
    num_layers: int = 12
    classifier: str = "token"
    posemb: str = "learn"
    representation_size: int | None = None
    ln_eps: float = 1e-6
    gelu: str = "tanh"
    qk_norm: bool = False
    dropout: float = 0.0
    attn_dropout: float = 0.0
    head_bias_init: float | None = None
    moe: MoEConfig | None = None
    moe_layers: tuple[int, ...] = field(default_factory=tuple)
    wide_mlp_layers: tuple[int, ...] = field(default_factory=tuple)
    wide_mlp_factor: int = 1
    patch_merger_after: int | None = None
    patch_merger_tokens: int = 8
    patch_merger_source: str = "normed"
    patch_merger_scale: str | None = None

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in (
            "image_size",
            "patch_size",
            "in_chans",
            "hidden_size",
            "mlp_dim",
            "num_heads",
            "num_layers",
        ):
            _positive_int(name, getattr(self, name))
        if (
            isinstance(self.num_classes, bool)
            or not isinstance(self.num_classes, int)
            or (self.num_classes < 0)
        ):
            raise ValueError(f"num_classes must be an integer >= 0, got {self.num_classes!r}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        _choice("classifier", self.classifier, CLASSIFIERS)
        _choice("posemb", self.posemb, POSEMBS)
        _choice("gelu", self.gelu, GELU_VARIANTS)
        _positive_int("representation_size", self.representation_size, allow_none=True)
        _positive_float("ln_eps", self.ln_eps)
        object.__setattr__(self, "moe_layers", tuple(sorted(set(self.moe_layers))))
        bad = [i for i in self.moe_layers if not (isinstance(i, int) and 0 <= i < self.num_layers)]
        if bad:
            raise ValueError(
                f"moe_layers {bad} out of range; block indices must be in [0, {self.num_layers})"
            )
        object.__setattr__(self, "wide_mlp_layers", tuple(sorted(set(self.wide_mlp_layers))))
        _positive_int("wide_mlp_factor", self.wide_mlp_factor)
        bad = [i for i in self.wide_mlp_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"wide_mlp_layers {bad} out of range [0, {self.num_layers})")
        if self.patch_merger_after is not None and not (
            0 <= self.patch_merger_after < self.num_layers - 1
        ):
            raise ValueError(
                f"patch_merger_after={self.patch_merger_after} must be a block index in "
                f"[0, {self.num_layers - 1}) (the merger sits between two blocks)"
            )
        _positive_int("patch_merger_tokens", self.patch_merger_tokens)
        _choice("patch_merger_source", self.patch_merger_source, MERGE_SOURCES)
        _choice("patch_merger_scale", self.patch_merger_scale, LOGIT_SCALES)
        if self.moe_layers and self.moe is None:
            raise ValueError(f"moe_layers={self.moe_layers} given but moe config is None")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        return self.num_patches + (1 if self.classifier == "token" else 0)

    def mlp_dim_at_block(self, index: int) -> int:
        """Hidden width of block ``index``'s MLP or experts (wider in a dense twin's MoE blocks)."""
        return self.mlp_dim * (self.wide_mlp_factor if index in self.wide_mlp_layers else 1)

    def tokens_at_block(self, index: int) -> int:
        """Tokens per image entering block ``index`` (fewer after a patch merger)."""
        if self.patch_merger_after is not None and index > self.patch_merger_after:
            return self.patch_merger_tokens + (1 if self.classifier == "token" else 0)
        return self.num_tokens

    @property
    def ensemble_members(self) -> int:
        return 1 if self.moe is None else self.moe.ensemble_members

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["moe"] = (
            None
            if self.moe is None
            else {f.name: getattr(self.moe, f.name) for f in fields(self.moe)}
        )
        out["moe_layers"] = list(self.moe_layers)
        out["wide_mlp_layers"] = list(self.wide_mlp_layers)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> ViTConfig:
        data = dict(data)
        moe = data.pop("moe", None)
        data["moe_layers"] = tuple(data.get("moe_layers", ()))
        data["wide_mlp_layers"] = tuple(data.get("wide_mlp_layers", ()))
        return cls(**data, moe=None if moe is None else MoEConfig(**moe))


def dense_twin(config: ViTConfig) -> ViTConfig:
    """The dense model with the same active FLOPs per token as a top-K MoE ``config``.

    Each MoE block becomes a dense MLP of ``K * mlp_dim`` hidden units (a token-choice token is
    processed by K experts of width ``mlp_dim``); everything else is unchanged.
    """
    if config.moe is None:
        return config
    if config.moe.router != "top_k":
        raise ValueError(f"dense_twin is defined for token-choice MoEs, got {config.moe.router!r}")
    from dataclasses import replace

    return replace(
        config,
        moe=None,
        moe_layers=(),
        wide_mlp_layers=config.moe_layers,
        wide_mlp_factor=config.moe.top_k,
    )
