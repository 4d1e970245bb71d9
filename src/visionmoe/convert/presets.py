"""Named settings for the checkpoints released with google-research/vmoe.

A checkpoint's tensors fix the architecture (width, depth, heads, experts, MoE placement,
classes), which :func:`visionmoe.convert.load_vmoe` infers; what they cannot tell is how the model
was *run*: top-K, capacity factors, the input resolution it was trained at. A preset records those
from the released configs, plus the architecture it expects so that pairing a preset with the
wrong checkpoint fails loudly instead of loading weights into the wrong routing regime.

The released configs dispatch tokens in bfloat16; we dispatch in float32, so expect logits to
differ from the JAX evaluation by ~1e-3 (spec CHECKPOINT_FORMAT.md).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

# Architecture fields a preset states as expectations: they are checked against the checkpoint
# (unless the caller overrides them explicitly), never silently applied over it.
ARCHITECTURE_FIELDS = frozenset(
    {
        "hidden_size",
        "num_layers",
        "num_heads",
        "mlp_dim",
        "patch_size",
        "num_experts",
        "moe_layers",
        "num_classes",
        "representation_size",
        "image_size",
        "ensemble_members",
    }
)


@dataclass(frozen=True)
class VmoePreset:
    """Model overrides for one released checkpoint family.

    Attributes:
      description: one line.
      overrides: flat :class:`~visionmoe.models.ViTConfig` / MoE overrides (architecture fields are
        checked against the checkpoint, the rest applied).
      released: the checkpoint names of the vmoe README this preset covers.
      reported: accuracy the vmoe configs report, for orientation.
    """

    description: str
    overrides: dict[str, Any]
    released: tuple[str, ...] = ()
    reported: str = ""


_S32 = {
    "hidden_size": 512,
    "num_layers": 8,
    "num_heads": 8,
    "mlp_dim": 2048,
    "patch_size": 32,
    "num_experts": 8,
    "moe_layers": (5, 7),
}
_B16 = {
    "hidden_size": 768,
    "num_layers": 12,
    "num_heads": 12,
    "mlp_dim": 3072,
    "patch_size": 16,
    "num_experts": 8,
    "moe_layers": (1, 3, 5, 7, 9, 11),
}
# Routing of the released V-MoE configs: K=2, cf 1.05 in training, groups of 8 images, capacity
# rounded up to a multiple of 4.
_VMOE_ROUTING = {
    "top_k": 2,
    "capacity_factor": 1.05,
    "group_images": 8,
    "capacity_rounding": "ceil",
    "capacity_multiple_of": 4,
}

VMOE_PRESETS: MappingProxyType[str, VmoePreset] = MappingProxyType(
    {
        "vmoe_s32_last2_ilsvrc2012": VmoePreset(
            "V-MoE-S/32, E=8, K=2, Last-2, ILSVRC2012 from scratch at 224px (eval cf 4.0)",
            {
                **_S32,
                **_VMOE_ROUTING,
                "image_size": 224,
                "num_classes": 1000,
                "representation_size": 512,
                "eval_capacity_factor": 4.0,
            },
            released=(
                "vmoe_s32_last2_ilsvrc2012_randaug_light1",
                "vmoe_s32_last2_ilsvrc2012_randaug_medium",
            ),
            reported="ImageNet val 73.1% (light1)",
        ),
        "vmoe_s32_last2_ilsvrc2012_ft": VmoePreset(
            "V-MoE-S/32 Last-2 fine-tuned on ILSVRC2012 at 384px (eval cf 1.05)",
            {
                **_S32,
                **_VMOE_ROUTING,
                "image_size": 384,
                "num_classes": 1000,
                "eval_capacity_factor": 1.05,
            },
            released=("vmoe_s32_last2_ilsvrc2012_randaug_light1_ft_ilsvrc2012",),
            reported="ImageNet val 75.9%",
        ),
        "vmoe_b16_imagenet21k": VmoePreset(
            "V-MoE-B/16, E=8, K=2, Every-2, ImageNet-21k upstream at 224px",
            {
                **_B16,
                **_VMOE_ROUTING,
                "image_size": 224,
                "num_classes": 21843,
                "eval_capacity_factor": 1.05,
            },
            released=("vmoe_b16_imagenet21k_randaug_strong",),
        ),
        "vmoe_b16_imagenet21k_ft_ilsvrc2012": VmoePreset(
            "V-MoE-B/16 Every-2 (ImageNet-21k) fine-tuned on ILSVRC2012 at 384px",
            {
                **_B16,
                **_VMOE_ROUTING,
                "image_size": 384,
                "num_classes": 1000,
                "eval_capacity_factor": 1.05,
            },
            released=("vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012",),
            reported="ImageNet val 85.6%",
        ),
        "eee_s32_last2_ilsvrc2012": VmoePreset(
            "E^3-S/32, E=8 in 2 members of 4, K=1, Last-2, ILSVRC2012 at 224px",
            {
                **_S32,
                **_VMOE_ROUTING,
                "top_k": 1,
                "ensemble_members": 2,
                "image_size": 224,
                "num_classes": 1000,
            },
            released=("eee_s32_last2_ilsvrc2012",),
        ),
        "eee_s32_last2_ilsvrc2012_ft_cifar100": VmoePreset(
            "E^3-S/32 Last-2 fine-tuned on CIFAR-100 at 128px (cf 1.5)",
            {
                **_S32,
                **_VMOE_ROUTING,
                "top_k": 1,
                "ensemble_members": 2,
                "capacity_factor": 1.5,
                "image_size": 128,
                "num_classes": 100,
            },
            released=("eee_s32_last2_ilsvrc2012_ft_cifar100",),
            reported="CIFAR-100 test 81.3%",
        ),
    }
)


def get_preset(name: str) -> VmoePreset:
    """A preset by its name or by the released checkpoint name it covers."""
    if name in VMOE_PRESETS:
        return VMOE_PRESETS[name]
    for preset in VMOE_PRESETS.values():
        if name in preset.released:
            return preset
    names = list(VMOE_PRESETS) + [r for p in VMOE_PRESETS.values() for r in p.released]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown vmoe preset {name!r}{hint} (known: {', '.join(VMOE_PRESETS)})")
