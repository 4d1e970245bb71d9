"""The single-file export: a sharded checkpoint as a standard single-process checkpoint.

    python -m visionmoe.distributed.export RUN      # RUN/checkpoints/step_.../ from RUN/sharded/

The result is what ``visionmoe train`` writes (``model.safetensors``, ``optimizer.safetensors``,
``meta.json``), so ``visionmoe eval/sweep/inspect RUN`` and single-process ``--resume`` read it.
It is streamed: the safetensors header is written from the tensors' shapes, then each tensor is
read from the shards (experts merged), written and dropped, so memory holds one tensor at a time
rather than the model and optimizer state. The optimizer's parameter order and hyperparameters
come from a parameter-free (meta-device) model built from the saved config.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from visionmoe.distributed.checkpoint import ShardedReader
from visionmoe.distributed.expert_parallel import expert_parameter_names
from visionmoe.distributed.groups import ParallelGroups
from visionmoe.models.vit import VisionTransformer
from visionmoe.train.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    _sha256,
    optimizer_to_flat,
    publish_checkpoint_dir,
)
from visionmoe.train.config import ExperimentConfig
from visionmoe.train.optim import build_optimizer

_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

Spec = tuple[torch.dtype, tuple[int, ...]]


def write_safetensors_streamed(
    path: Path, specs: dict[str, Spec], read: Callable[[str], Tensor]
) -> None:
    """A safetensors file holding ``read(key)`` for every key of ``specs``, one at a time.

    Layout (the safetensors format): 8-byte little-endian header length, a JSON header giving
    each tensor's dtype, shape and ``[begin, end)`` byte offsets, padded with spaces to a
    multiple of 8, then the raw little-endian bytes of each tensor in offset order.
    """
    header, offset = {}, 0
    for key in sorted(specs):
        dtype, shape = specs[key]
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[key] = {
            "dtype": _CODES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key in sorted(specs):
            tensor = read(key).detach().cpu().contiguous()
            if (tensor.dtype, tuple(tensor.shape)) != specs[key]:
                raise CheckpointError(
                    f"{key}: read {tensor.dtype} {tuple(tensor.shape)}, expected {specs[key]}"
                )
            f.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())


def export_merged(
    sharded: str | os.PathLike, run_dir: str | os.PathLike | None = None, keep: int = 2
) -> Path:
    """Write the newest sharded checkpoint of ``sharded`` (a run or checkpoint directory) as
    standard checkpoint ``run_dir/checkpoints/step_<step>`` (default: the run it came from)."""
    reader = ShardedReader(sharded)
    layout = reader.layout
    config = ExperimentConfig.from_dict(layout["config"])
    run_dir = Path(run_dir) if run_dir is not None else Path(layout["path"]).parent.parent
    with torch.device("meta"):
        model = VisionTransformer(config.model)
    optimizer = build_optimizer(model, config.optim)
    _, optimizer_meta = optimizer_to_flat(optimizer)
    index = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            index[p] = len(index)
    position = {name: index[p] for name, p in model.named_parameters() if p in index}
    specs = reader.specs()
    model_specs = {k.removeprefix("model/"): v for k, v in specs.items() if k.startswith("model/")}
    optim_keys = {}  # standard key "<position>.<slot>" -> sharded key "optim/<name>/<slot>"
    for key in specs:
        if key.startswith("optim/"):
            name, slot = key.removeprefix("optim/").rsplit("/", 1)
            optim_keys[f"{position[name]}.{slot}"] = key
    rng = reader.rng(0)
    optim_specs = {k: specs[v] for k, v in optim_keys.items()}
    optim_specs["rng.torch"] = (rng.dtype, tuple(rng.shape))

    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{layout['step']:07d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{name}-"))
    write_safetensors_streamed(
        tmp / "model.safetensors", model_specs, lambda k: reader.read(f"model/{k}")
    )
    write_safetensors_streamed(
        tmp / "optimizer.safetensors",
        optim_specs,
        lambda k: rng if k == "rng.torch" else reader.read(optim_keys[k]),
    )
    extra = {"world_size": layout["world_size"], "expert_parallel": layout["expert_parallel"]}
    meta = {
        "format_version": FORMAT_VERSION,
        "step": layout["step"],
        "config": layout["config"],
        "extra": extra,
        "optimizer": optimizer_meta,
        "sha256": {f: _sha256(tmp / f) for f in ("model.safetensors", "optimizer.safetensors")},
    }
    return publish_checkpoint_dir(tmp, root, name, meta, keep)


def state_bytes(num_params: int, optimizer_slots: int) -> int:
    """Bytes of float32 weights plus ``optimizer_slots`` float32 tensors per weight."""
    return 4 * num_params * (1 + optimizer_slots)


def count_parameters(model: nn.Module, groups: ParallelGroups) -> int:
    """Parameters of the single-process model (DTensors count globally, experts N times)."""
    experts = expert_parameter_names(model)
    return sum(
        p.numel() * (groups.expert_parallel if name in experts else 1)
        for name, p in model.named_parameters()
    )


def wants_merged(config: ExperimentConfig, num_params: int) -> bool:
    """Whether the run ends by writing the single-file checkpoint (``parallel`` config)."""
    if config.parallel.merged_checkpoint is not None:
        return config.parallel.merged_checkpoint
    slots = 2 if config.optim.name == "adamw" else 1
    return state_bytes(num_params, slots) <= config.parallel.merged_checkpoint_max_gb * 2**30


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m visionmoe.distributed.export",
        description="Write a distributed run's newest sharded checkpoint as one standard "
        "checkpoint (readable by visionmoe eval/sweep/inspect and single-process --resume).",
    )
    parser.add_argument("run", help="run directory (or sharded checkpoint directory)")
    parser.add_argument("--out", help="run directory to write into (default: the same run)")
    args = parser.parse_args(argv)
    try:
        path = export_merged(args.run, args.out)
    except (CheckpointError, OSError, ValueError) as err:
        print(f"visionmoe export: error: {err}", file=sys.stderr)
        return 2
    print(f"checkpoint: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
