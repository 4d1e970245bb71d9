"""Map vmoe's parameter tree (Flax names and layouts) onto our VisionTransformer state dict.

The tree layout is listed in ``shared/spec/CHECKPOINT_FORMAT.md``. Flax dense kernels are
``(in, out)`` while ``nn.Linear`` stores ``(out, in)``; attention keeps per-head axes
(``(D, h, D/h)``) that we flatten head-major and fuse into one ``qkv`` matrix; expert kernels are
already stacked input-major as ours are, so they pass through untouched. Everything the tree
cannot tell (top-K, capacities, grouping) comes from vmoe's released configs or a preset.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from visionmoe.convert.presets import ARCHITECTURE_FIELDS, get_preset
from visionmoe.convert.report import ConversionReport, apply_state
from visionmoe.convert.vmoe_format import read_vmoe_checkpoint
from visionmoe.models.config import ViTConfig
from visionmoe.models.registry import apply_overrides
from visionmoe.models.vit import VisionTransformer

_BLOCK = r"Encoder/encoderblock_(\d+)/"


# Defaults of the released vmoe configs that the tensors cannot reveal.
VMOE_MODEL_DEFAULTS: dict[str, Any] = {"ln_eps": 1e-6, "gelu": "tanh", "posemb": "learn"}
VMOE_MOE_DEFAULTS: dict[str, Any] = {
    "top_k": 2,
    "capacity_factor": 1.05,
    "group_images": 8,
    "capacity_rounding": "ceil",
    "capacity_multiple_of": 4,
}


def flatten_tree(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a/b/c": leaf}`` from a nested dict (vmoe's ``/``-joined parameter names)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_tree(value, f"{name}/"))
        else:
            out[name] = value
    return out


def _tensor(array: Any) -> torch.Tensor:
    """float32 tensor; bfloat16 (ml_dtypes) and other dtypes are widened first."""
    array = np.asarray(array)
    if array.dtype != np.float32:
        array = array.astype(np.float32)
    with warnings.catch_warnings():
        # Read-only inputs are fine: converted tensors are only ever copied from, never written.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _linear(a: torch.Tensor) -> torch.Tensor:
    return a.T


def _conv(a: torch.Tensor) -> torch.Tensor:
    return a.permute(3, 2, 0, 1)  # HWIO -> OIHW


def _heads_out(a: torch.Tensor) -> torch.Tensor:
    h, dh, d = a.shape
    return a.reshape(h * dh, d).T


def _router(a: torch.Tensor) -> torch.Tensor:
    # E^3 kernels (D, members, E/members): member m's experts become rows [m*E/M, (m+1)*E/M) of
    # our (E, D) weight, the layout of the ensemble MoE layer (M=1 is a plain router).
    return a.reshape(a.shape[0], -1).T


def _same(a: torch.Tensor) -> torch.Tensor:
    return a


# (pattern over the vmoe name, our key template filled with the block index, transform)
_RULES: list[tuple[re.Pattern, str, Callable[[torch.Tensor], torch.Tensor]]] = [
    (re.compile(p), key, fn)
    for p, key, fn in [
        ("embedding/kernel", "patch_embed.proj.weight", _conv),
        ("embedding/bias", "patch_embed.proj.bias", _same),
        ("cls", "cls_token", _same),
        ("Encoder/posembed_input/pos_embedding", "pos_embed", _same),
        (_BLOCK + "LayerNorm_0/scale", "blocks.{}.norm1.weight", _same),
        (_BLOCK + "LayerNorm_0/bias", "blocks.{}.norm1.bias", _same),
        (_BLOCK + "LayerNorm_1/scale", "blocks.{}.norm2.weight", _same),
        (_BLOCK + "LayerNorm_1/bias", "blocks.{}.norm2.bias", _same),
        (_BLOCK + "SelfAttention/out/kernel", "blocks.{}.attn.proj.weight", _heads_out),
        (_BLOCK + "SelfAttention/out/bias", "blocks.{}.attn.proj.bias", _same),
        (_BLOCK + "Mlp/Dense_0/kernel", "blocks.{}.ffn.fc1.weight", _linear),
        (_BLOCK + "Mlp/Dense_0/bias", "blocks.{}.ffn.fc1.bias", _same),
        (_BLOCK + "Mlp/Dense_1/kernel", "blocks.{}.ffn.fc2.weight", _linear),
        (_BLOCK + "Mlp/Dense_1/bias", "blocks.{}.ffn.fc2.bias", _same),
        (_BLOCK + "Moe/Mlp/Dense_0/kernel", "blocks.{}.ffn.experts.w1", _same),
        (_BLOCK + "Moe/Mlp/Dense_0/bias", "blocks.{}.ffn.experts.b1", _same),
        (_BLOCK + "Moe/Mlp/Dense_1/kernel", "blocks.{}.ffn.experts.w2", _same),
        (_BLOCK + "Moe/Mlp/Dense_1/bias", "blocks.{}.ffn.experts.b2", _same),
        (_BLOCK + "Moe/Router/dense/kernel", "blocks.{}.ffn.router.proj.weight", _router),
        (_BLOCK + "Moe/Router/mu", "blocks.{}.ffn.router.mu", _same),
        (_BLOCK + "Moe/Router/scale", "blocks.{}.ffn.router.scale", _same),
        ("Encoder/encoder_norm/scale", "norm.weight", _same),
        ("Encoder/encoder_norm/bias", "norm.bias", _same),
        ("pre_logits/kernel", "pre_logits.0.weight", _linear),
        ("pre_logits/bias", "pre_logits.0.bias", _same),
        ("head/kernel", "head.weight", _linear),
        ("head/bias", "head.bias", _same),
    ]
]
_QKV = re.compile(_BLOCK + r"SelfAttention/(query|key|value)/(kernel|bias)")
_QKV_ORDER = ("query", "key", "value")


def convert_vmoe_tree(tree: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Our state dict (float32 tensors) from a vmoe parameter tree, and what was (not) mapped.

    Accepts the nested dict of :func:`read_vmoe_checkpoint` or a flat ``{"a/b": array}`` dict.
    ``report.missing`` stays empty here; :func:`load_vmoe` fills it against the built model.
    E^3 router kernels ``(D, M, E/M)`` become the ``(E, D)`` weight of the ensemble MoE layer.
    """
    flat = flatten_tree(tree) if any(isinstance(v, Mapping) for v in tree.values()) else tree
    state: dict[str, torch.Tensor] = {}
    report = ConversionReport("vmoe tree")
    qkv: dict[tuple[int, str], dict[str, tuple[str, torch.Tensor]]] = {}
    for name, value in flat.items():
        match = _QKV.fullmatch(name)
        if match:
            block, part, kind = match.groups()
            qkv.setdefault((int(block), kind), {})[part] = (name, _tensor(value))
            continue
        for pattern, key, fn in _RULES:
            match = pattern.fullmatch(name)
            if match:
                key = key.format(*match.groups())
                state[key] = fn(_tensor(value))
                report.mapped[key] = [name]
                break
        else:
            report.unmapped.append(name)
    for (block, kind), parts in sorted(qkv.items()):
        if set(parts) != set(_QKV_ORDER):
            report.unmapped.extend(name for name, _ in parts.values())
            report.notes.append(f"block {block}: attention {kind} lacks one of query/key/value")
            continue
        pieces = []
        for part in _QKV_ORDER:
            a = parts[part][1]
            # kernel (D, h, D/h) -> (D_out, D_in); bias (h, D/h) -> (D,)
            pieces.append(a.reshape(a.shape[0], -1).T if kind == "kernel" else a.reshape(-1))
        key = f"blocks.{block}.attn.qkv.{'weight' if kind == 'kernel' else 'bias'}"
        state[key] = torch.cat(pieces, dim=0)
        report.mapped[key] = [parts[p][0] for p in _QKV_ORDER]
    report.unmapped.sort()
    return state, report


def infer_vmoe_config(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Flat model overrides read off the tree's shapes (architecture only, no routing knobs)."""
    flat = flatten_tree(tree) if any(isinstance(v, Mapping) for v in tree.values()) else tree
    shape = {name: tuple(np.shape(v)) for name, v in flat.items()}
    if "embedding/kernel" not in shape:
        raise ValueError("not a vmoe ViT tree: no 'embedding/kernel' (patch embedding)")
    patch, _, in_chans, width = shape["embedding/kernel"]
    blocks = sorted({int(m.group(1)) for n in shape if (m := re.match(_BLOCK, n))})
    if not blocks or blocks != list(range(len(blocks))):
        raise ValueError(f"encoder blocks must be numbered 0..L-1, found {blocks}")
    out: dict[str, Any] = {
        "hidden_size": width,
        "patch_size": patch,
        "in_chans": in_chans,
        "num_layers": len(blocks),
        "classifier": "token" if "cls" in shape else "gap",
        "representation_size": shape.get("pre_logits/kernel", (None, None))[1],
        "num_classes": shape.get("head/kernel", (None, 0))[1],
    }
    query = shape.get("Encoder/encoderblock_0/SelfAttention/query/kernel")
    if query is not None and len(query) == 3:
        out["num_heads"] = query[1]
    prefix = 1 if "cls" in shape else 0
    pos = shape.get("Encoder/posembed_input/pos_embedding")
    if pos is None:
        out["posemb"] = "sincos2d"
    else:
        grid = math.isqrt(pos[1] - prefix)
        if grid * grid != pos[1] - prefix:
            raise ValueError(f"position embedding {pos} is not a square grid (+{prefix} prefix)")
        out["image_size"] = grid * patch
    moe_layers, experts = [], set()
    for i in blocks:
        b = f"Encoder/encoderblock_{i}/"
        if b + "Moe/Mlp/Dense_0/kernel" in shape:
            moe_layers.append(i)
            experts.add(shape[b + "Moe/Mlp/Dense_0/kernel"][0])
            out["mlp_dim"] = shape[b + "Moe/Mlp/Dense_0/kernel"][2]
            router = shape.get(b + "Moe/Router/dense/kernel")
            if router is not None and len(router) == 3 and router[1] > 1:
                out["ensemble_members"] = router[1]  # E^3
            mu = shape.get(b + "Moe/Router/mu")
            if mu is not None:
                out.update(router="soft", slots_per_expert=mu[2])
        elif b + "Mlp/Dense_0/kernel" in shape:
            out["mlp_dim"] = shape[b + "Mlp/Dense_0/kernel"][1]
    if len(experts) > 1:
        raise ValueError(f"MoE blocks disagree on the number of experts: {sorted(experts)}")
    if moe_layers:
        out["moe_layers"] = tuple(moe_layers)
        out["num_experts"] = experts.pop()
    return out


def vmoe_model_config(
    inferred: dict[str, Any], preset: dict[str, Any], user: dict[str, Any]
) -> ViTConfig:
    """The model config: vmoe defaults < inferred < preset < user overrides.

    Architecture fields a preset states must agree with the checkpoint unless the user overrides
    them, so a preset paired with the wrong checkpoint fails here rather than mid-load.
    """
    conflicts = {
        k: (inferred[k], v)
        for k, v in preset.items()
        if k in ARCHITECTURE_FIELDS and k in inferred and k not in user and inferred[k] != v
    }
    if conflicts:
        detail = ", ".join(
            f"{k}: checkpoint {a!r} vs preset {b!r}" for k, (a, b) in conflicts.items()
        )
        raise ValueError(f"checkpoint does not match the preset ({detail})")
    merged = {**VMOE_MODEL_DEFAULTS, **inferred, **preset, **user}
    if merged.get("moe_layers"):
        moe_defaults = dict(VMOE_MOE_DEFAULTS)
        if merged.get("router") == "soft":
            # One image per group unless the caller sets vmoe's group_size (tokens); vmoe's Soft
            # MoE router always dispatches in bfloat16, so converted models do too by default.
            moe_defaults.update(group_images=1, noise_std=0.0, importance_weight=0.0)
            moe_defaults.update(load_weight=0.0, bf16_dispatch=True)
        merged = {**moe_defaults, **merged}
    width = merged.pop("hidden_size")
    base = ViTConfig(hidden_size=width, num_heads=merged.pop("num_heads", max(1, width // 64)))
    # The MoE sub-config is created by apply_overrides from the MoE fields present.
    return apply_overrides(base, **merged)


def load_vmoe(
    prefix: str | os.PathLike | Mapping[str, Any],
    preset: str | None = None,
    *,
    return_report: bool = False,
    **model_overrides: Any,
) -> VisionTransformer | tuple[VisionTransformer, ConversionReport]:
    """Build our model from a released vmoe checkpoint (eval mode, float32).

    The architecture is inferred from the tensors; ``preset`` (see ``VMOE_PRESETS``) adds the
    routing of the released config and checks the architecture; ``model_overrides`` (flat
    ViT/MoE field names) win over both. Overriding ``image_size`` resizes the position embedding,
    overriding ``num_classes`` gives a new zero head (fine-tuning). Unmapped tensors warn.

    Raises:
      VmoeFormatError: unreadable checkpoint files.
      ValueError: preset mismatches, or weights that do not fit the model.
    """
    source = "vmoe tree" if isinstance(prefix, Mapping) else os.fspath(prefix)
    tree = prefix if isinstance(prefix, Mapping) else read_vmoe_checkpoint(prefix)
    spec = get_preset(preset) if preset is not None else None
    config = vmoe_model_config(
        infer_vmoe_config(tree), dict(spec.overrides) if spec else {}, model_overrides
    )
    state, report = convert_vmoe_tree(tree)
    report.source = source
    model = VisionTransformer(config)
    apply_state(model, state, report)
    if report.unmapped:
        warnings.warn(f"vmoe conversion left tensors unused:\n{report.summary()}", stacklevel=2)
    model.eval()
    return (model, report) if return_report else model
