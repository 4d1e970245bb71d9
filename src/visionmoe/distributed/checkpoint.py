"""Sharded checkpoints of expert-parallel runs, and re-sharding them to any world size.

Layout of a run directory trained with :mod:`visionmoe.distributed.train`::

    sharded/step_0000500/
        layout.json                          world size, expert parallelism N, expert ranges,
                                             SHA-256 of every file, the run config
        replicated.safetensors               rank 0: every non-expert tensor + its optimizer state
        experts-rank{r}-of-{N}.safetensors   rank r < N: its expert slices + their optimizer state
        rng.safetensors                      each rank's torch RNG state (exact resume at equal W)
    sharded/latest                           name of the newest complete sharded checkpoint
    checkpoints/step_.../                    the merged single-process checkpoint (standard format)

Sharded checkpoints live beside ``checkpoints/`` rather than in it because the standard writer
owns ``checkpoints/step_*`` (it replaces and prunes them). Tensors are stored as ``model/<name>``
and ``optim/<parameter>/<slot>``: optimizer state is keyed by parameter name, not by position, so
it re-shards exactly like the weights. Each rank writes its own file into a shared temporary
directory; rank 0 checks that all arrived, records their hashes, then renames the directory into
place and moves ``latest``, so a crash mid-save leaves the previous checkpoint intact. Ranks on
several nodes therefore need ``run_dir`` on a shared filesystem for sharded checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from visionmoe.distributed.expert_parallel import expert_modules, expert_range
from visionmoe.distributed.groups import ParallelGroups
from visionmoe.models.vit import VisionTransformer
from visionmoe.train.checkpoint import (
    CheckpointError,
    _fsync_dir,
    _sha256,
    atomic_write_text,
    save_checkpoint,
)
from visionmoe.train.config import ExperimentConfig
from visionmoe.train.optim import build_optimizer

SHARDED_DIR = "sharded"
LAYOUT_FORMAT = "visionmoe-sharded-v1"
REPLICATED_FILE = "replicated.safetensors"
RNG_FILE = "rng.safetensors"


def expert_file(rank: int, expert_parallel: int) -> str:
    return f"experts-rank{rank}-of-{expert_parallel}.safetensors"


def _param_name(key: str) -> str:
    """``model/a.b.w1`` and ``optim/a.b.w1/exp_avg`` -> ``a.b.w1``."""
    kind, rest = key.split("/", 1)
    return rest.rsplit("/", 1)[0] if kind == "optim" else rest


def _is_expert_key(key: str, expert_prefixes: set[str] | dict) -> bool:
    return _param_name(key).rsplit(".", 1)[0] in expert_prefixes


def training_tensors(
    model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> dict[str, Tensor]:
    """``model/<name>`` state and ``optim/<parameter>/<slot>`` optimizer state of this rank."""
    out = {f"model/{k}": v for k, v in model.state_dict().items()}
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        for param, slots in optimizer.state.items():
            for slot, value in slots.items():
                if value is not None:
                    out[f"optim/{names[id(param)]}/{slot}"] = torch.as_tensor(value)
    return out


def load_optimizer_tensors(
    model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor]
) -> None:
    """Load ``optim/<parameter>/<slot>`` tensors into ``optimizer`` (built for ``model``)."""
    by_param: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            by_param.setdefault(_param_name(key), {})[key.rsplit("/", 1)[1]] = value
    names = {id(p): n for n, p in model.named_parameters()}
    ordered = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    state = {i: by_param[name] for i, name in enumerate(ordered) if name in by_param}
    groups = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _write(path: Path, tensors: dict[str, Tensor]) -> str:
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return _sha256(path)


def save_sharded(
    run_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    config: dict,
    groups: ParallelGroups,
    keep: int = 2,
) -> Path:
    """Write sharded checkpoint ``step`` (every rank calls this); keep the newest ``keep``."""
    root = Path(run_dir) / SHARDED_DIR
    name = f"step_{step:07d}"
    tmp = root / f".tmp-{name}"
    if groups.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    tensors = training_tensors(model, optimizer)
    experts = {n: m.num_experts for n, m in expert_modules(model).items()}
    N = groups.expert_parallel
    written: dict[str, str] = {}
    if groups.writes_expert_shard:
        mine = {k: v for k, v in tensors.items() if _is_expert_key(k, experts)}
        filename = expert_file(groups.expert_rank, N)
        written[filename] = _write(tmp / filename, mine)
    if groups.is_main:
        rest = {k: v for k, v in tensors.items() if not _is_expert_key(k, experts)}
        written[REPLICATED_FILE] = _write(tmp / REPLICATED_FILE, rest)
    rng = torch.get_rng_state()
    gathered: list[Any] = [None] * groups.world_size
    dist.all_gather_object(gathered, (written, rng))
    if groups.is_main:
        hashes = {k: v for files, _ in gathered for k, v in files.items()}
        rngs = {f"rank{r}": state for r, (_, state) in enumerate(gathered)}
        hashes[RNG_FILE] = _write(tmp / RNG_FILE, rngs)
        missing = [f for f in hashes if not (tmp / f).is_file()]
        if missing:
            raise CheckpointError(
                f"sharded checkpoint files {missing} written by other ranks are not visible in "
                f"{tmp}; multi-node runs need run_dir on a shared filesystem"
            )
        layout = {
            "format": LAYOUT_FORMAT,
            "step": step,
            "world_size": groups.world_size,
            "expert_parallel": N,
            "experts": {
                n: {"num_experts": e, "ranges": [list(expert_range(e, N, r)) for r in range(N)]}
                for n, e in experts.items()
            },
            "sha256": hashes,
            "config": config,
        }
        atomic_write_text(tmp / "layout.json", json.dumps(layout, indent=1, sort_keys=True))
        _fsync_dir(tmp)
        final = root / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(root)
        atomic_write_text(root / "latest", name)
        for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return root / name


def resolve_sharded(path: str | os.PathLike) -> Path:
    """A sharded checkpoint directory from a run directory, its ``sharded/`` or itself."""
    path = Path(path)
    if (path / "layout.json").is_file():
        return path
    for root in (path / SHARDED_DIR, path):
        latest = root / "latest"
        if latest.is_file():
            target = root / latest.read_text().strip()
            if (target / "layout.json").is_file():
                return target
            raise CheckpointError(f"sharded checkpoint {target} named by {latest} is incomplete")
    raise CheckpointError(f"no sharded checkpoint at '{path}' (expected {SHARDED_DIR}/latest)")


def read_layout(path: str | os.PathLike) -> dict:
    """The ``layout.json`` of the sharded checkpoint at ``path`` (run or checkpoint directory)."""
    ckpt = resolve_sharded(path)
    try:
        layout = json.loads((ckpt / "layout.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {ckpt / 'layout.json'}: {err}") from None
    if layout.get("format") != LAYOUT_FORMAT:
        raise CheckpointError(f"{ckpt}: unsupported sharded format {layout.get('format')!r}")
    layout["path"] = str(ckpt)
    return layout


def _load_verified(ckpt: Path, filename: str, layout: dict) -> dict[str, Tensor]:
    file = ckpt / filename
    if not file.is_file():
        raise CheckpointError(f"checkpoint file {file} is missing")
    if _sha256(file) != layout["sha256"].get(filename):
        raise CheckpointError(
            f"checkpoint file {file} is truncated or corrupted (SHA-256 does not match "
            "layout.json); refusing to load it"
        )
    return load_file(str(file))


def load_sharded_tensors(
    path: str | os.PathLike, world_size: int = 1, rank: int = 0
) -> dict[str, Tensor]:
    """Every ``model/`` and ``optim/`` tensor of expert-parallel rank ``rank`` of ``world_size``.

    Reads only the expert files that overlap the wanted slice, whatever N the run was saved
    with: any ``world_size`` dividing every layer's expert count works, 1 giving the full model.
    """
    layout = read_layout(path)
    ckpt = Path(layout["path"])
    out = dict(_load_verified(ckpt, REPLICATED_FILE, layout))
    N, experts = layout["expert_parallel"], layout["experts"]
    files: dict[int, dict[str, Tensor]] = {}

    def shard(source: int) -> dict[str, Tensor]:
        if source not in files:
            files[source] = _load_verified(ckpt, expert_file(source, N), layout)
        return files[source]

    with safe_open(str(ckpt / expert_file(0, N)), "pt") as first:
        keys = sorted(first.keys())
    for key in keys:
        layer = experts[_param_name(key).rsplit(".", 1)[0]]
        start, stop = expert_range(layer["num_experts"], world_size, rank)
        parts = []
        for source, (lo, hi) in enumerate(layer["ranges"]):
            if lo >= stop or hi <= start:
                continue
            tensor = shard(source)[key]
            if tensor.ndim == 0:  # a per-parameter scalar such as Adam's step count
                parts = [tensor]
                break
            parts.append(tensor[max(start, lo) - lo : min(stop, hi) - lo])
        out[key] = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out


def _model_part(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}


def load_sharded(path: str | os.PathLike, world_size: int = 1, rank: int = 0) -> dict[str, Tensor]:
    """Model state dict for expert-parallel rank ``rank`` of ``world_size`` (re-sharded)."""
    return _model_part(load_sharded_tensors(path, world_size, rank))


def gather_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """The single-process model state dict of a sharded checkpoint (all experts merged)."""
    return load_sharded(path, 1, 0)


def load_rng(path: str | os.PathLike, rank: int) -> Tensor:
    layout = read_layout(path)
    return _load_verified(Path(layout["path"]), RNG_FILE, layout)[f"rank{rank}"]


@torch.no_grad()
def gather_full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, groups: ParallelGroups
) -> dict[str, Tensor] | None:
    """Single-process ``model/`` + ``optim/`` tensors on rank 0 (None elsewhere).

    Collects the expert slices through the first expert-parallel group, so it works without a
    shared filesystem. Every rank must call it.
    """
    tensors = training_tensors(model, optimizer)
    N = groups.expert_parallel
    if N == 1 or not groups.writes_expert_shard:
        return tensors if groups.is_main else None
    prefixes = set(expert_modules(model))
    out = {}
    for key in sorted(tensors):
        tensor = tensors[key]
        if not _is_expert_key(key, prefixes) or tensor.ndim == 0:
            out[key] = tensor
            continue
        parts = [torch.empty_like(tensor) for _ in range(N)] if groups.is_main else None
        dist.gather(tensor.contiguous(), parts, dst=0, group=groups.expert_group)
        if parts is not None:
            out[key] = torch.cat(parts)
    return out if groups.is_main else None


def save_merged_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    tensors: dict[str, Tensor],
    config: ExperimentConfig,
    keep: int = 2,
    extra: dict | None = None,
) -> Path:
    """Write full ``model/`` + ``optim/`` tensors as a standard single-process checkpoint.

    ``visionmoe eval/sweep/inspect`` and single-process ``--resume`` read it unchanged.
    """
    with torch.random.fork_rng(devices=[]):  # building the model must not move the saved RNG
        model = VisionTransformer(config.model)
    model.load_state_dict({k: v.cpu() for k, v in _model_part(tensors).items()})
    optimizer = build_optimizer(model, config.optim)
    load_optimizer_tensors(model, optimizer, {k: v.cpu() for k, v in tensors.items()})
    return save_checkpoint(run_dir, step, model, optimizer, config.to_dict(), extra, keep)
