"""Sparse upcycling (Komatsuzaki et al., arXiv 2212.05055): turn a trained dense ViT into an MoE.

Every chosen block's MLP is copied into each of E experts, a fresh router is added, and all other
weights are copied unchanged, so the new model starts from what the dense one learned instead of
from scratch (spec section 6). With token-choice routing and ``normalize_combine=True`` (combine
weights renormalised over the K picks) and no dropped tokens, the upcycled model computes exactly
the dense function at step 0; the router then learns to specialise the copies.

Optimizer state can be carried over too: each MLP's slots (AdamW ``exp_avg`` / ``exp_avg_sq`` /
``step``, SGD momentum) are copied into every expert in the expert layout; the router starts
with empty slots. Optimizer state is exchanged keyed by parameter *name*
(:func:`named_optimizer_state`), since the parameter list of the MoE model differs.
"""

from __future__ import annotations

import json
import os
import re
import typing
from contextlib import nullcontext
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch

from visionmoe.hub import save_pretrained
from visionmoe.models.config import MoEConfig, ViTConfig
from visionmoe.models.registry import apply_overrides
from visionmoe.models.variants import every_n
from visionmoe.models.vit import VisionTransformer
from visionmoe.train.checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from visionmoe.train.config import ExperimentConfig, apply_set, parse_value
from visionmoe.train.optim import build_optimizer

UPCYCLE_ROUTERS = ("top_k", "expert_choice")
NamedOptimizerState = dict[str, dict[str, torch.Tensor]]
_MLP = re.compile(r"blocks\.(\d+)\.ffn\.(fc1|fc2)\.(weight|bias)")
_EXPERT_OF = {("fc1", "weight"): "w1", ("fc1", "bias"): "b1"}
_EXPERT_OF.update({("fc2", "weight"): "w2", ("fc2", "bias"): "b2"})
# Library defaults for Expert Choice in vision (one image per group, no padding, no aux loss);
# the upcycling paper's vision runs use cf = 2.
_EXPERT_CHOICE_DEFAULTS = {
    "capacity_factor": 2.0,
    "group_images": 1,
    "capacity_rounding": "round",
    "capacity_multiple_of": None,
    "importance_weight": 0.0,
    "load_weight": 0.0,
}


def upcycle_config(
    config: ViTConfig,
    moe_layers: tuple[int, ...] | list[int] | None = None,
    num_experts: int = 8,
    router: str = "top_k",
    top_k: int | None = None,
    capacity_factor: float | None = None,
    normalize_combine: bool = False,
    **moe_overrides: Any,
) -> ViTConfig:
    """The MoE config a dense ``config`` upcycles to (see :func:`upcycle` for the arguments)."""
    if config.moe_layers:
        raise ValueError(
            f"upcycling starts from a dense model; this one already has MoE blocks "
            f"{config.moe_layers}"
        )
    if router not in UPCYCLE_ROUTERS:
        raise ValueError(f"router must be one of {UPCYCLE_ROUTERS}, got {router!r}")
    layers = every_n(config.num_layers, 2) if moe_layers is None else tuple(moe_layers)
    if not layers:
        raise ValueError("moe_layers is empty: choose at least one block to upcycle")
    moe: dict[str, Any] = {"router": router, "num_experts": num_experts}
    moe["expert_dropout"] = config.dropout  # experts keep the dense MLP's dropout
    if router == "expert_choice":
        if top_k is not None:
            raise ValueError("top_k applies to router='top_k'; expert_choice sets capacity only")
        if normalize_combine:
            raise ValueError(
                "normalize_combine is only supported with router='top_k': with expert choice a "
                "token can be picked by no expert at all, so renormalising the combine weights "
                "per token still would not reproduce the dense model at step 0"
            )
        moe.update(_EXPERT_CHOICE_DEFAULTS)
    else:
        moe.update(top_k=2 if top_k is None else top_k, renormalize=normalize_combine)
    if capacity_factor is not None:
        moe["capacity_factor"] = capacity_factor
    moe.update(moe_overrides)
    unknown = sorted(set(moe) - {f for f in MoEConfig.__dataclass_fields__})
    if unknown:
        raise ValueError(f"unknown MoE option(s) {unknown}")
    return apply_overrides(config, moe_layers=layers, **moe)


def named_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``{parameter name: {slot: tensor}}`` for the parameters of ``model`` in ``optimizer``."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: NamedOptimizerState = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            slots = optimizer.state.get(param)
            if slots and id(param) in names:
                out[names[id(param)]] = {
                    k: v.detach().clone() if isinstance(v, torch.Tensor) else torch.tensor(v)
                    for k, v in slots.items()
                }
    return out


def load_named_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: NamedOptimizerState
) -> None:
    """Load name-keyed slots into ``optimizer`` (built for ``model``); absent names stay fresh."""
    own = optimizer.state_dict()
    index = {}
    params = {id(p): n for n, p in model.named_parameters()}
    position = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            index[params[id(param)]] = position
            position += 1
    unknown = sorted(set(state) - set(index))
    if unknown:
        raise ValueError(f"optimizer state for parameters the optimizer lacks: {unknown[:5]}")
    own["state"] = {index[name]: dict(slots) for name, slots in state.items()}
    optimizer.load_state_dict(own)


def _expert_tensor(value: torch.Tensor, kind: str, num_experts: int) -> torch.Tensor:
    """A dense MLP tensor (or its same-shaped optimizer slot) in the stacked expert layout."""
    value = value.T if kind == "weight" else value  # Linear (out, in) -> input-major (in, out)
    return value.unsqueeze(0).expand(num_experts, *value.shape).clone()


def _to_experts(
    tensors: dict[str, torch.Tensor], layers: tuple[int, ...], num_experts: int
) -> dict[str, torch.Tensor]:
    """Rename and tile the chosen blocks' MLP tensors into expert tensors; the rest unchanged."""
    out = {}
    for name, value in tensors.items():
        match = _MLP.fullmatch(name)
        if match and int(match.group(1)) in layers:
            block, layer, kind = match.groups()
            key = f"blocks.{block}.ffn.experts.{_EXPERT_OF[(layer, kind)]}"
            out[key] = _expert_tensor(value, kind, num_experts)
        else:
            out[name] = value
    return out


def _upcycle_optimizer_state(
    state: NamedOptimizerState,
    dense: VisionTransformer,
    layers: tuple[int, ...],
    num_experts: int,
) -> NamedOptimizerState:
    shapes = {n: p.shape for n, p in dense.named_parameters()}
    out: NamedOptimizerState = {}
    for name, slots in state.items():
        match = _MLP.fullmatch(name)
        if not (match and int(match.group(1)) in layers):
            out[name] = {k: v.clone() for k, v in slots.items()}
            continue
        block, layer, kind = match.groups()
        key = f"blocks.{block}.ffn.experts.{_EXPERT_OF[(layer, kind)]}"
        # Slots shaped like the parameter follow it into the expert layout; scalars (step) copy.
        out[key] = {
            slot: _expert_tensor(v, kind, num_experts) if v.shape == shapes[name] else v.clone()
            for slot, v in slots.items()
        }
    return out


def upcycle(
    dense_model_or_checkpoint: VisionTransformer | str | os.PathLike,
    moe_layers: tuple[int, ...] | list[int] | None = None,
    num_experts: int = 8,
    router: str = "top_k",
    top_k: int | None = None,
    capacity_factor: float | None = None,
    normalize_combine: bool = False,
    router_init_std: float | None = None,
    expert_noise: float = 0.0,
    optimizer_state: NamedOptimizerState | torch.optim.Optimizer | None = None,
    seed: int | None = None,
    **moe_overrides: Any,
) -> VisionTransformer | tuple[VisionTransformer, NamedOptimizerState]:
    """Sparse-upcycle a dense ViT into an MoE ViT.

    Args:
      dense_model_or_checkpoint: a dense :class:`VisionTransformer`, or any source
        :func:`visionmoe.load_model` opens (see :func:`upcycle_run` to also get a run's config).
      moe_layers: blocks whose MLP becomes an MoE (default: every other block, 1, 3, ...).
      num_experts: E copies of each MLP.
      router: ``"top_k"`` (V-MoE token choice) or ``"expert_choice"`` (cf 2 by default).
      top_k: K for token choice (default 2).
      capacity_factor: training cf (default 1.05 token choice, 2.0 expert choice).
      normalize_combine: renormalise each token's K combine weights to sum to 1 (top_k only);
        with no dropping the model then equals the dense one at step 0.
      router_init_std: router kernel ~ N(0, std^2); None keeps the LeCun-normal init.
      expert_noise: std of Gaussian noise added to every expert's kernels to break the symmetry
        of the copies (absolute, default 0 = exact copies).
      optimizer_state: the dense model's optimizer state keyed by parameter name
        (:func:`named_optimizer_state`) or its optimizer itself; if given, the upcycled state is
        returned too (load it with :func:`load_named_optimizer_state`).
      seed: seed for the router init and expert noise (None: the global torch RNG).
      moe_overrides: further :class:`~visionmoe.models.MoEConfig` fields (``group_images``,
        ``eval_capacity_factor``, ``noise_std``, ...).

    Returns:
      The MoE model (same train/eval mode, device and dtype as the dense one), or
      ``(model, optimizer_state)`` when ``optimizer_state`` was given.
    """
    if isinstance(dense_model_or_checkpoint, VisionTransformer):
        dense = dense_model_or_checkpoint
    else:
        dense = _load_dense(dense_model_or_checkpoint, False)[0]
    config = upcycle_config(
        dense.config,
        moe_layers,
        num_experts,
        router,
        top_k,
        capacity_factor,
        normalize_combine,
        **moe_overrides,
    )
    layers, num_experts = config.moe_layers, config.moe.num_experts
    reference = next(dense.parameters())
    rng = torch.random.fork_rng(devices=[]) if seed is not None else nullcontext()
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        model = VisionTransformer(config).to(device=reference.device, dtype=reference.dtype)
        state = _to_experts(dense.state_dict(), layers, num_experts)
        missing, unexpected = model.load_state_dict(state, strict=False)
        routers = {f"blocks.{i}.ffn.router.proj.weight" for i in layers}
        if set(missing) != routers or unexpected:
            raise RuntimeError(f"upcycling mismatch: missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            for i in layers:
                ffn = model.blocks[i].ffn
                if router_init_std is not None:
                    torch.nn.init.normal_(ffn.router.proj.weight, std=router_init_std)
                if expert_noise:
                    for w in (ffn.experts.w1, ffn.experts.w2):
                        w.add_(expert_noise * torch.randn_like(w))
    model.train(dense.training)
    if optimizer_state is None:
        return model
    if isinstance(optimizer_state, torch.optim.Optimizer):
        optimizer_state = named_optimizer_state(dense, optimizer_state)
    return model, _upcycle_optimizer_state(optimizer_state, dense, layers, num_experts)


def _load_dense(
    source: str | os.PathLike, reuse_optimizer_state: bool
) -> tuple[VisionTransformer, ExperimentConfig | None, NamedOptimizerState | None, Path]:
    from visionmoe.loading import load_model

    dense, info = load_model(source)
    if not isinstance(dense, VisionTransformer):
        raise ValueError(
            f"{source} holds a {type(dense).__name__}; upcycling needs a ViT image classifier"
        )
    named = None
    if reuse_optimizer_state:
        if info.experiment is None:
            raise ValueError(
                f"reuse_optimizer_state needs a run or checkpoint with optimizer state; "
                f"'{source}' is a {info.kind} source"
            )
        ckpt = load_checkpoint(source, with_optimizer=True)
        optimizer = build_optimizer(dense, info.experiment.optim)
        optimizer.load_state_dict(ckpt["optimizer"])
        named = named_optimizer_state(dense, optimizer)
    return dense, info.experiment, named, info.checkpoint or Path(source)


def upcycle_run(
    run_or_checkpoint: str | os.PathLike, reuse_optimizer_state: bool = False, **kwargs: Any
) -> tuple[VisionTransformer, ExperimentConfig | None, NamedOptimizerState | None]:
    """Upcycle the latest weights of a model (``kwargs``: see :func:`upcycle`).

    ``run_or_checkpoint`` is any source :func:`visionmoe.load_model` opens. Returns the model,
    the run's config with the MoE model in place (training continues with the same data /
    optimizer / schedule; None for a pretrained folder or vmoe checkpoint, which hold no training
    settings), and the upcycled optimizer state when ``reuse_optimizer_state`` (else None).
    """
    dense, config, named, _ = _load_dense(run_or_checkpoint, reuse_optimizer_state)
    if named is None:
        model = upcycle(dense, **kwargs)
    else:
        model, named = upcycle(dense, optimizer_state=named, **kwargs)
    return model, None if config is None else replace(config, model=model.config), named


# Typed options of upcycle_cli that are not MoEConfig fields.
_CLI_TYPES: dict[str, Any] = {
    "moe_layers": tuple[int, ...],
    "num_experts": int,
    "router": str,
    "top_k": int,
    "capacity_factor": float,
    "normalize_combine": bool,
    "router_init_std": float | None,
    "expert_noise": float,
    "seed": int,
    "reuse_optimizer_state": bool,
}


def _parse_cli(overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Split ``key=value`` strings into upcycle kwargs and ``section.field=value`` config sets."""
    moe_types = typing.get_type_hints(MoEConfig)
    options: dict[str, Any] = {}
    sets: list[str] = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"upcycle option {item!r} must look like key=value")
        name = key.removeprefix("model.").removeprefix("moe.")
        if name in _CLI_TYPES:
            options[name] = parse_value(text, _CLI_TYPES[name], key)
        elif name in moe_types:
            options[name] = parse_value(text, moe_types[name], key)
        elif "." in key and not key.startswith("model."):
            sets.append(item)  # train.steps=..., optim.lr=..., validated by apply_set
        else:
            known = sorted(set(_CLI_TYPES) | set(moe_types))
            raise ValueError(f"unknown upcycle option {key!r}; known: {', '.join(known)}")
    return options, sets


def _model_set_args(before: ViTConfig, after: ViTConfig) -> list[str]:
    """``--set`` strings that turn ``before`` into ``after`` (for ``visionmoe train --init``)."""
    old, new = before.to_dict(), after.to_dict()
    # A dense config gets MoEConfig defaults for every MoE field not set explicitly.
    old_moe = old.pop("moe") or {f.name: getattr(MoEConfig(), f.name) for f in fields(MoEConfig)}
    new_moe = new.pop("moe") or {}
    out = []
    for key, value in [*new.items(), *new_moe.items()]:
        previous = old[key] if key in old else old_moe.get(key)
        if value != previous:
            text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            out.append(f"model.{key}={text}")
    return out


def upcycle_cli(
    run_or_checkpoint: str | os.PathLike, out_dir: str | os.PathLike, overrides: list[str]
) -> Path:
    """Upcycle a model and write it to ``out_dir`` (returned).

    From a run or checkpoint, ``out_dir`` is a run-like folder (below); from a pretrained folder
    or vmoe checkpoint (no training settings) it is a ``save_pretrained`` folder, to fine-tune
    with ``visionmoe train --recipe R --init OUT``.

    ``overrides`` are ``key=value`` strings: :func:`upcycle` options (``num_experts=16``,
    ``moe_layers=1,3``, ``router=expert_choice``, ``normalize_combine=true``, ...), any MoE field
    (``group_images=1``; a ``model.`` prefix is accepted) and ``section.field=value`` settings for
    the continued run (``train.steps=2000``). The folder holds ``config.json`` and
    ``checkpoints/step_0000000``, so ``visionmoe train --init OUT`` (with the ``--set`` flags
    listed in ``upcycle.json``) and :func:`visionmoe.load_model` accept it; with
    ``reuse_optimizer_state=true`` the checkpoint also holds the carried-over optimizer state.
    """
    options, sets = _parse_cli(list(overrides))
    reuse = options.pop("reuse_optimizer_state", False)
    dense, config, named, source = _load_dense(run_or_checkpoint, reuse)
    if named is None:
        model = upcycle(dense, **options)
    else:
        model, named = upcycle(dense, optimizer_state=named, **options)
    record = {
        "upcycled_from": str(source),
        "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
        "reuse_optimizer_state": reuse,
        "train_set": _model_set_args(dense.config, model.config),
    }
    out = Path(out_dir)
    if config is None:
        if sets:
            raise ValueError(
                f"'{run_or_checkpoint}' holds no training settings to change; drop {sets[0]!r} "
                "and pass it to visionmoe train --recipe R --init OUT instead"
            )
        save_pretrained(model, out, extra={"upcycle": record})
        atomic_write_text(out / "upcycle.json", json.dumps(record, indent=2, sort_keys=True))
        return out
    config = replace(config, model=model.config)
    config = apply_set(config, sets) if sets else config
    optimizer = None
    if named is not None:
        optimizer = build_optimizer(model, config.optim)
        load_named_optimizer_state(model, optimizer, named)
    save_checkpoint(out, 0, model, optimizer, config.to_dict(), extra={"upcycle": record})
    atomic_write_text(out / "config.json", config.to_json())
    atomic_write_text(out / "upcycle.json", json.dumps(record, indent=2, sort_keys=True))
    return out
