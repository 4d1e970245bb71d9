"""Load dense ViT weights from timm, Hugging Face ``transformers`` or big_vision into our model.

All three are pre-LN ViTs with the same arithmetic as ours, so a port is a renaming plus a few
layout changes: timm's names are nearly ours; Hugging Face splits q/k/v into three ``Linear``s
that we fuse; big_vision (and the older ``vit_jax``) are Flax trees in vmoe's lineage, so they
are renamed into vmoe names and go through :func:`convert_vmoe_tree`. What differs between the
libraries and is invisible in the tensors, the LayerNorm epsilon and the GELU variant, is set per
format so outputs match the source library. Files are read without unpickling arbitrary objects
(safetensors, ``np.load(allow_pickle=False)``, ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visionmoe.convert.report import ConversionReport, apply_state
from visionmoe.convert.vmoe_params import convert_vmoe_tree, infer_vmoe_config
from visionmoe.models.config import ViTConfig
from visionmoe.models.registry import apply_overrides
from visionmoe.models.vit import VisionTransformer

FORMATS = ("auto", "timm", "hf", "big_vision")
# What each library uses and the tensors cannot show.
FORMAT_DEFAULTS: dict[str, dict[str, Any]] = {
    "timm": {"ln_eps": 1e-6, "gelu": "exact"},
    "hf": {"ln_eps": 1e-12, "gelu": "exact"},
    "big_vision": {"ln_eps": 1e-6, "gelu": "tanh"},
}
_STATE_KEYS = ("state_dict", "model", "params", "model_state_dict")


def read_weights(path: str | os.PathLike) -> dict[str, Any]:
    """A flat name -> array/tensor dict from a weights file (or a folder holding one)."""
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in '{path}'")
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at '{path}'")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path)))
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # each reader fails its own way on a file that is not its format
        raise ValueError(
            f"'{path}' is not a readable weights file (safetensors, npz, or a torch state dict "
            f"saved with torch.save): {type(err).__name__}: {err}"
        ) from err
    while isinstance(state, Mapping) and len(state) == 1 and next(iter(state)) in _STATE_KEYS:
        state = next(iter(state.values()))
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} does not hold a state dict (found {type(state).__name__})")
    return dict(state)


def detect_format(names: list[str]) -> str:
    """``timm``, ``hf`` or ``big_vision`` from the parameter names."""
    if any("/" in n for n in names):
        return "big_vision"
    if any(n.startswith(("vit.embeddings.", "embeddings.patch_embeddings")) for n in names):
        return "hf"
    if "patch_embed.proj.weight" in names:
        return "timm"
    raise ValueError(
        f"cannot tell the format of these weights (first names: {sorted(names)[:5]}); pass "
        f"format= one of {FORMATS[1:]}"
    )


def _float(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to(torch.float32)
    return torch.from_numpy(np.asarray(value, dtype=np.float32))


# ---------------------------------------------------------------------------------------------
# timm and Hugging Face: renaming (plus q/k/v fusion for HF)

_TIMM_RENAMES = [
    (re.compile(r"blocks\.(\d+)\.mlp\.(fc[12])\.(weight|bias)"), r"blocks.\1.ffn.\2.\3"),
    (re.compile(r"pre_logits\.fc\.(weight|bias)"), r"pre_logits.0.\1"),
    (
        re.compile(
            r"(cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)|"
            r"head\.(weight|bias)|blocks\.\d+\.(norm[12]|attn\.(qkv|proj|q_norm|k_norm))"
            r"\.(weight|bias))"
        ),
        r"\1",
    ),
]
_HF_RENAMES = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layer\.(\d+)\.layernorm_before\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"encoder\.layer\.(\d+)\.layernorm_after\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"blocks.\1.ffn.fc1.\2"),
    (r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"blocks.\1.ffn.fc2.\2"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
    (r"classifier\.(weight|bias)", r"head.\1"),
]
_HF_RENAMES_RE = [(re.compile(p), r) for p, r in _HF_RENAMES]
_HF_QKV = re.compile(
    r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)"
)


def _rename(
    state: Mapping[str, Any], rules: list, report: ConversionReport, strip: str = ""
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        short = name[len(strip) :] if strip and name.startswith(strip) else name
        for pattern, repl in rules:
            if pattern.fullmatch(short):
                key = pattern.sub(repl, short)
                out[key] = _float(value)
                report.mapped[key] = [name]
                break
        else:
            report.unmapped.append(name)
    return out


def _from_timm(state: Mapping[str, Any], report: ConversionReport) -> dict[str, torch.Tensor]:
    out = _rename(state, _TIMM_RENAMES, report)
    for key in [k for k in out if k.endswith(".attn.qkv.weight")]:
        bias = key[: -len("weight")] + "bias"
        if bias not in out:  # timm models built with qkv_bias=False: zero bias is the same map
            out[bias] = out[key].new_zeros(out[key].shape[0])
            report.notes.append(f"{bias}: absent (qkv_bias=False), set to zeros")
    return out


def _from_hf(state: Mapping[str, Any], report: ConversionReport) -> dict[str, torch.Tensor]:
    strip = "vit." if any(n.startswith("vit.") for n in state) else ""
    qkv: dict[tuple[str, str], dict[str, tuple[str, Any]]] = {}
    rest = {}
    for name, value in state.items():
        match = _HF_QKV.fullmatch(name[len(strip) :] if name.startswith(strip) else name)
        if match:
            block, part, kind = match.groups()
            qkv.setdefault((block, kind), {})[part] = (name, value)
        else:
            rest[name] = value
    out = _rename(rest, _HF_RENAMES_RE, report, strip)
    for (block, kind), parts in sorted(qkv.items()):
        if set(parts) != {"query", "key", "value"}:
            report.unmapped.extend(n for n, _ in parts.values())
            continue
        key = f"blocks.{block}.attn.qkv.{kind}"
        out[key] = torch.cat([_float(parts[p][1]) for p in ("query", "key", "value")])
        report.mapped[key] = [parts[p][0] for p in ("query", "key", "value")]
    return out


def _infer_torch_config(state: Mapping[str, torch.Tensor], report: ConversionReport) -> dict:
    """Architecture from our-named tensors; num_heads is not recoverable (fused q/k/v)."""
    if "patch_embed.proj.weight" not in state:
        raise ValueError("no patch embedding weight among the converted tensors")
    width, in_chans, patch, _ = state["patch_embed.proj.weight"].shape
    blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    if not blocks or blocks != list(range(len(blocks))):
        raise ValueError(f"blocks must be numbered 0..L-1, found {blocks}")
    out = {
        "hidden_size": width,
        "in_chans": in_chans,
        "patch_size": patch,
        "num_layers": len(blocks),
        "classifier": "token" if "cls_token" in state else "gap",
        "num_classes": state["head.weight"].shape[0] if "head.weight" in state else 0,
        "qk_norm": "blocks.0.attn.q_norm.weight" in state,
    }
    if "blocks.0.ffn.fc1.weight" in state:
        out["mlp_dim"] = state["blocks.0.ffn.fc1.weight"].shape[0]
    if "pre_logits.0.weight" in state:
        out["representation_size"] = state["pre_logits.0.weight"].shape[0]
    if "pos_embed" in state:
        out["image_size"] = _grid(state, report, "pos_embed", "cls_token") * patch
    else:
        out["posemb"] = "sincos2d"
    return out


def _grid(state: dict, report: ConversionReport, pos_key: str, cls_key: str) -> int:
    """Patch-grid side of a learned position embedding, padding a zero row for the class token.

    Some libraries (big_vision, timm ``no_embed_class``) add the position embedding before
    prepending the class token; ours covers the class token too, and a zero row is equivalent.
    """
    pos = state[pos_key]
    count = pos.shape[1]
    prefix = 1 if cls_key in state else 0
    grid = math.isqrt(count)
    if prefix and grid * grid == count:
        if isinstance(pos, torch.Tensor):
            state[pos_key] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
        else:
            state[pos_key] = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
        report.notes.append("position embedding excludes the class token: zero row prepended")
        return grid
    grid = math.isqrt(count - prefix)
    if grid * grid != count - prefix:
        raise ValueError(f"position embedding of {count} entries is not a square patch grid")
    return grid


# ---------------------------------------------------------------------------------------------
# big_vision / vit_jax: rename into vmoe names, then reuse the vmoe mapping

_BV_BLOCK = re.compile(r"Transformer/encoderblock_(\d+)/(.+)")


def _big_vision_to_vmoe(flat: Mapping[str, Any], report: ConversionReport) -> dict[str, str]:
    """``{vmoe_name: original_name}`` for a flat big_vision / vit_jax parameter dict."""
    names = {n[len("params/") :] if n.startswith("params/") else n: n for n in flat}
    if any(n.startswith("params/") for n in flat):
        report.unmapped.extend(n for n in flat if not n.startswith("params/"))
        names = {k: v for k, v in names.items() if v.startswith("params/")}
    norms: dict[str, list[str]] = {}
    for short in names:
        match = _BV_BLOCK.fullmatch(short)
        if match and (ln := re.match(r"(LayerNorm_\d+)/", match.group(2))):
            norms.setdefault(match.group(1), []).append(ln.group(1))
    norm_rank = {
        (block, ln): f"LayerNorm_{rank}"
        for block, lns in norms.items()
        for rank, ln in enumerate(sorted(set(lns), key=lambda s: int(s.split("_")[1])))
    }
    out: dict[str, str] = {}
    for short, original in names.items():
        match = _BV_BLOCK.fullmatch(short)
        if match:
            block, rest = match.groups()
            rest = re.sub(r"^MultiHeadDotProductAttention_\d+/", "SelfAttention/", rest)
            rest = re.sub(r"^MlpBlock_\d+/", "Mlp/", rest)
            if ln := re.match(r"(LayerNorm_\d+)/", rest):
                rest = norm_rank[(block, ln.group(1))] + rest[ln.end(1) :]
            new = f"Encoder/encoderblock_{block}/{rest}"
        elif short in ("pos_embedding", "Transformer/posembed_input/pos_embedding"):
            new = "Encoder/posembed_input/pos_embedding"
        elif short.startswith("Transformer/encoder_norm/"):
            new = "Encoder/" + short[len("Transformer/") :]
        else:
            new = short
        out[new] = original
    return out


def _unstack_scanned(flat: dict[str, Any]) -> dict[str, Any]:
    """big_vision ``scan=True`` stores all blocks stacked under ``encoderblock/``: split them."""
    out = {}
    for name, value in flat.items():
        head, sep, tail = name.partition("Transformer/encoderblock/")
        if not sep:
            out[name] = value
            continue
        for i in range(np.shape(value)[0]):
            out[f"{head}Transformer/encoderblock_{i}/{tail}"] = value[i]
    return out


def _from_big_vision(
    flat: Mapping[str, Any], report: ConversionReport
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    flat = _unstack_scanned(dict(flat))
    renames = _big_vision_to_vmoe(flat, report)
    tree = {new: np.asarray(flat[old], dtype=np.float32) for new, old in renames.items()}
    if "cls" in tree and "Encoder/posembed_input/pos_embedding" in tree:
        _grid(tree, report, "Encoder/posembed_input/pos_embedding", "cls")
    inferred = infer_vmoe_config(tree)
    state, sub = convert_vmoe_tree(tree)
    report.mapped.update({k: [renames.get(n, n) for n in v] for k, v in sub.mapped.items()})
    report.unmapped.extend(renames.get(n, n) for n in sub.unmapped)
    report.notes.extend(sub.notes)
    return state, inferred


# ---------------------------------------------------------------------------------------------


def load_dense_vit(
    path_or_state_dict: str | os.PathLike | Mapping[str, Any],
    format: str = "auto",
    *,
    strict: bool = True,
    **overrides: Any,
) -> tuple[VisionTransformer, ConversionReport]:
    """Our dense :class:`VisionTransformer` (eval mode) from timm / HF / big_vision weights.

    The architecture is inferred from the tensors. ``num_heads`` cannot be read from timm or
    Hugging Face weights (q/k/v are stored as full matrices): pass it, else ``hidden_size // 64``
    is assumed (right for the standard Ti/S/B/L/H sizes). ``overrides`` (flat ViT field names)
    win over what was inferred; a different ``num_classes`` or ``image_size`` gives a new head
    or a resized position embedding. Unused source tensors are listed in ``report.unmapped``;
    missing parameters raise when ``strict`` (else they keep their initial values).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if isinstance(path_or_state_dict, Mapping):
        state, source = dict(path_or_state_dict), "state dict"
    else:
        state, source = read_weights(path_or_state_dict), os.fspath(path_or_state_dict)
    if format == "auto":
        format = detect_format(list(state))
    report = ConversionReport(f"{source} ({format})")
    if format == "big_vision":
        ours, inferred = _from_big_vision(state, report)
    else:
        ours = (_from_timm if format == "timm" else _from_hf)(state, report)
        inferred = _infer_torch_config(ours, report)
    merged = {**FORMAT_DEFAULTS[format], **inferred, **overrides}
    width = merged.pop("hidden_size")
    heads = merged.pop("num_heads", None)
    if heads is None:
        heads = max(1, width // 64)
        if width % heads:
            raise ValueError(f"cannot guess num_heads for width {width}; pass num_heads=")
        report.notes.append(f"num_heads not stored in {format} weights: assumed {heads}")
    model = VisionTransformer(
        apply_overrides(ViTConfig(hidden_size=width, num_heads=heads), **merged)
    )
    apply_state(model, ours, report, strict=strict)
    return model.eval(), report
