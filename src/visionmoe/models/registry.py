"""Named model configs: ``create_model(name, **overrides)`` and ``list_models()``.

Overrides use flat names: any :class:`ViTConfig` field (``image_size``, ``num_classes``,
``moe_layers``, ...) or any :class:`MoEConfig` field (``num_experts``, ``top_k``,
``capacity_factor``, ``group_size``, ...).
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import fields, replace

from visionmoe.models.config import ROUTER_DEFAULTS, MoEConfig, ViTConfig, dense_twin
from visionmoe.models.variants import (
    VMOE_SIZES,
    every_n,
    last_n,
    last_n_contiguous,
    size_kwargs,
)
from visionmoe.models.vit import VisionTransformer

_REGISTRY: dict[str, Callable[[], ViTConfig]] = {}
VIT_FIELDS = frozenset(f.name for f in fields(ViTConfig)) - {"moe"}
MOE_FIELDS = frozenset(f.name for f in fields(MoEConfig))


def register_model(fn: Callable[[], ViTConfig]) -> Callable[[], ViTConfig]:
    """Register a zero-argument function returning a :class:`ViTConfig` under its name."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a glob pattern, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def model_description(name: str) -> str:
    """First docstring line of a registered model."""
    return (_REGISTRY[name].__doc__ or "").strip().splitlines()[0]


def get_config(name: str, **overrides) -> ViTConfig:
    """The config of model ``name`` with flat ``overrides`` applied (validated)."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} (see visionmoe.list_models())")
    return apply_overrides(_REGISTRY[name](), **overrides)


def apply_overrides(config: ViTConfig, **overrides) -> ViTConfig:
    """Apply flat ViT/MoE field overrides to a config; unknown names are errors."""
    unknown = sorted(set(overrides) - VIT_FIELDS - MOE_FIELDS)
    if unknown:
        allowed = sorted(VIT_FIELDS | MOE_FIELDS)
        close = difflib.get_close_matches(unknown[0], allowed, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model option(s) {unknown}{hint}")
    vit = {k: v for k, v in overrides.items() if k in VIT_FIELDS}
    moe = {k: v for k, v in overrides.items() if k in MOE_FIELDS}
    if "moe_layers" in vit:
        vit["moe_layers"] = tuple(vit["moe_layers"])
    moe_config = config.moe
    router = moe.get("router")
    if router in ROUTER_DEFAULTS and (moe_config is None or moe_config.router != router):
        # A new router brings its own defaults (see ROUTER_DEFAULTS) unless set here too.
        moe = {**ROUTER_DEFAULTS[router], **moe}
    if moe:
        moe_config = replace(moe_config, **moe) if moe_config is not None else MoEConfig(**moe)
    if (
        moe_config is not None
        and moe_config is not config.moe
        and not (config.moe_layers or vit.get("moe_layers"))
    ):
        raise ValueError(
            f"MoE options {sorted(moe)} given for a dense model; also pass moe_layers=(...)"
        )
    if vit.get("moe_layers") and moe_config is None:
        moe_config = MoEConfig()
    return replace(config, moe=moe_config, **vit)


def create_model(name: str, **overrides) -> VisionTransformer:
    """Build a registered model, e.g. ``create_model("vmoe_s32_e8_last2", num_classes=10)``."""
    return VisionTransformer(get_config(name, **overrides))


def _vit(size: str, patch: int, **kw) -> ViTConfig:
    return ViTConfig(**size_kwargs(size), patch_size=patch, **kw)


@register_model
def vit_ti16() -> ViTConfig:
    """ViT-Ti/16, dense, 224px, ImageNet head."""
    return _vit("Ti", 16)


@register_model
def vit_s16() -> ViTConfig:
    """ViT-S/16, dense, 224px, ImageNet head."""
    return _vit("S", 16)


@register_model
def vit_b16() -> ViTConfig:
    """ViT-B/16, dense, 224px, ImageNet head."""
    return _vit("B", 16)


@register_model
def vit_debug() -> ViTConfig:
    """Tiny dense ViT (4 blocks, width 32, 32px, patch 8) for tests."""
    return ViTConfig(**size_kwargs("debug"), image_size=32, patch_size=8, num_classes=10)


def _vmoe(size: str, patch: int, placement: tuple[int, ...], **kw) -> ViTConfig:
    moe = MoEConfig(num_experts=8, top_k=2, capacity_factor=1.05, group_images=8)
    return ViTConfig(
        **size_kwargs(size, VMOE_SIZES), patch_size=patch, moe=moe, moe_layers=placement, **kw
    )


@register_model
def vmoe_s32_e8_last2() -> ViTConfig:
    """V-MoE-S/32 (8 blocks, D 512), E=8, K=2, Last-2 (blocks 5, 7), as released for ILSVRC2012."""
    cfg = _vmoe("S", 32, last_n(8, 2), representation_size=512)
    return replace(cfg, moe=replace(cfg.moe, eval_capacity_factor=4.0))


@register_model
def vit_s32_vmoe_twin() -> ViTConfig:
    """Dense twin of ``vmoe_s32_e8_last2`` at equal active FLOPs (2x-wide MLP in blocks 5, 7)."""
    return dense_twin(vmoe_s32_e8_last2())


@register_model
def vmoe_b16_e8_every2() -> ViTConfig:
    """V-MoE-B/16, E=8, K=2, Every-2 (blocks 1, 3, ..., 11), as released for ImageNet-21k."""
    return _vmoe("B", 16, every_n(12, 2), num_classes=21843)


@register_model
def vmoe_debug() -> ViTConfig:
    """Tiny V-MoE (4 blocks, E=4, K=2, Every-2) for tests."""
    moe = MoEConfig(num_experts=4, top_k=2, capacity_factor=1.05, group_images=2)
    return replace(vit_debug(), moe=moe, moe_layers=every_n(4, 2))


def _ec_or_soft(size: str, patch: int, moe: MoEConfig, **kw) -> ViTConfig:
    layers = size_kwargs(size)["num_layers"]
    return _vit(
        size,
        patch,
        classifier="gap",
        qk_norm=True,
        moe=moe,
        moe_layers=last_n_contiguous(layers, layers // 2),
        **kw,
    )


_EC = {
    "router": "expert_choice",
    "capacity_factor": 1.0,
    "group_images": 1,
    "capacity_rounding": "round",
    "capacity_multiple_of": None,
    "importance_weight": 0.0,
    "load_weight": 0.0,
}


@register_model
def ecmoe_s16_e32() -> ViTConfig:
    """Expert-Choice MoE-S/16, E=32, cf 1.0, MoE in the last 6 blocks, one image per group."""
    return _ec_or_soft("S", 16, MoEConfig(num_experts=32, **_EC))


@register_model
def ecmoe_debug() -> ViTConfig:
    """Tiny Expert-Choice MoE (4 blocks, E=4, last 2 blocks) for tests."""
    return replace(
        _ec_or_soft("debug", 8, MoEConfig(num_experts=4, **_EC)), image_size=32, num_classes=10
    )


_SOFT = {
    "router": "soft",
    "slots_per_expert": 1,
    "group_images": 1,
    "noise_std": 0.0,
    "importance_weight": 0.0,
    "load_weight": 0.0,
}


@register_model
def softmoe_s16_e128() -> ViTConfig:
    """Soft MoE-S/16, 128 experts x 1 slot, MoE in the last 6 blocks, GAP head, QK-norm."""
    return _ec_or_soft("S", 16, MoEConfig(num_experts=128, **_SOFT))


@register_model
def softmoe_debug() -> ViTConfig:
    """Tiny Soft MoE (4 blocks, 8 experts x 1 slot, last 2 blocks) for tests."""
    return replace(
        _ec_or_soft("debug", 8, MoEConfig(num_experts=8, **_SOFT)), image_size=32, num_classes=10
    )
