"""Atomic, verifiable checkpoints: safetensors weights + optimizer state + JSON metadata.

Layout of a run directory::

    config.json  metrics.jsonl  summary.json
    checkpoints/step_0000500/{model.safetensors, optimizer.safetensors, meta.json}
    checkpoints/latest          # name of the newest complete checkpoint

A checkpoint is written into a temporary directory, flushed to disk, then renamed into place,
and only then does ``latest`` move (itself replaced atomically), so a crash mid-save leaves the
previous checkpoint untouched. ``meta.json`` records the SHA-256 of every file; a truncated or
altered file is refused, never loaded. Nothing is unpickled.

``optimizer.safetensors`` also holds the random generators' states: ``rng.torch`` (CPU) and,
when CUDA is available, ``rng.cuda.<i>`` for every visible CUDA device, so router noise and
dropout continue exactly on resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or corrupted."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so readers see the old or the new content, never a mix."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage.
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def rng_state() -> dict[str, torch.Tensor]:
    """The CPU generator's state as ``rng.torch`` and each CUDA device's as ``rng.cuda.<i>``."""
    state = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            state[f"rng.cuda.{index}"] = cuda_state
    return state


def restore_rng_state(cpu: torch.Tensor, cuda: list[torch.Tensor] | None = None) -> None:
    """Set the CPU generator and, if saved and CUDA is available, the CUDA generators.

    A checkpoint saved with more CUDA devices than are visible now restores the first ones;
    one saved without CUDA leaves the CUDA generators as they are.
    """
    torch.set_rng_state(cpu)
    if cuda and torch.cuda.is_available():
        visible = torch.cuda.device_count()
        torch.cuda.set_rng_state_all(list(cuda)[:visible])


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able hyperparams."""
    state = optimizer.state_dict()
    tensors = {}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"{index}.{name}"] = tensor
    groups = [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
        for g in state["param_groups"]
    ]
    return tensors, {"param_groups": groups}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [
        {k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    config: dict,
    extra: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` atomically and keep only the newest ``keep`` ones."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{name}-"))
    files = {"model.safetensors": _tensors(model.state_dict())}
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "config": config,
        "extra": extra or {},
    }
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = optimizer_to_flat(optimizer)
        opt_tensors.update(rng_state())
        files["optimizer.safetensors"] = _tensors(opt_tensors)
    meta["sha256"] = {}
    for filename, tensors in files.items():
        save_file(tensors, str(tmp / filename))
        with open(tmp / filename, "rb+") as f:
            os.fsync(f.fileno())
        meta["sha256"][filename] = _sha256(tmp / filename)
    return publish_checkpoint_dir(tmp, root, name, meta, keep)


def publish_checkpoint_dir(tmp: Path, root: Path, name: str, meta: dict, keep: int) -> Path:
    """Write ``meta.json`` into the finished ``tmp`` folder, rename it to ``root/name``, point
    ``root/latest`` at it and delete all but the newest ``keep`` ``step_*`` folders."""
    atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=1, sort_keys=True))
    _fsync_dir(tmp)
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write_text(root / "latest", name)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory from a run directory, a checkpoints/ directory or itself."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    for root in (path / "checkpoints", path):
        latest = root / "latest"
        if latest.is_file():
            target = root / latest.read_text().strip()
            if not (target / "meta.json").is_file():
                raise CheckpointError(f"checkpoint {target} named by {latest} is incomplete")
            return target
    if not path.exists():
        raise CheckpointError(f"no run or checkpoint at '{path}'")
    raise CheckpointError(
        f"'{path}' holds no checkpoint; expected a run directory with checkpoints/latest or a "
        "checkpoint directory with meta.json and model.safetensors"
    )


def load_checkpoint(path: str | os.PathLike, with_optimizer: bool = False) -> dict[str, Any]:
    """Read and verify a checkpoint.

    Returns ``{"meta", "model"}``, plus with ``with_optimizer`` ``"optimizer"``, ``"rng"`` (the CPU
    generator state) and ``"rng_cuda"`` (list of CUDA generator states, empty if none was saved).
    """
    ckpt = resolve_checkpoint(path)
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {ckpt / 'meta.json'}: {err}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{ckpt}: unsupported checkpoint format {meta.get('format_version')}")
    wanted = ["model.safetensors"] + (["optimizer.safetensors"] if with_optimizer else [])
    out: dict[str, Any] = {"meta": meta, "path": ckpt}
    for filename in wanted:
        file = ckpt / filename
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {file} is missing")
        if _sha256(file) != meta["sha256"].get(filename):
            raise CheckpointError(
                f"checkpoint file {file} is truncated or corrupted (SHA-256 does not match "
                "meta.json); refusing to load it"
            )
        out[filename.split(".")[0]] = load_file(str(file))
    if with_optimizer:
        tensors = out.pop("optimizer")
        out["rng"] = tensors.pop("rng.torch")
        cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k[9:]))
        out["rng_cuda"] = [tensors.pop(k) for k in cuda]
        out["optimizer"] = optimizer_from_flat(tensors, meta["optimizer"])
    return out
