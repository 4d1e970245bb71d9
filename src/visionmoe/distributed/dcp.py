"""Training state through ``torch.distributed.checkpoint`` (DCP), for FSDP2-sharded runs.

FSDP2 already holds the dense weights and their optimizer state as DTensors sharded over the
ranks. The expert slices are plain tensors (each rank its E/N rows); they are presented to DCP
as DTensors on the ``("dp", "ep")`` mesh, replicated along ``dp`` and sharded on dim 0 along
``ep``, so every tensor in the checkpoint has its single-process (global) shape. DCP then writes
each rank's part once, and loading into the state of any other layout (world size, expert
parallelism) re-shards, as does loading into full-size tensors in one process.

Keys are those of the sharded format: ``model/<name>`` and ``optim/<parameter>/<slot>``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.tensor import DTensor, Replicate, Shard

from visionmoe.distributed.groups import ParallelGroups


def _global(tensor: Tensor, groups: ParallelGroups) -> Tensor:
    """An expert slice ``(El, ...)`` as a DTensor of global shape ``(E, ...)`` on the mesh."""
    shape = (tensor.shape[0] * groups.expert_parallel, *tensor.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(
        tensor, groups.mesh, [Replicate(), Shard(0)], run_check=False, shape=shape, stride=stride
    )


def distributed_state(
    tensors: dict[str, Tensor], is_expert: Callable[[str], bool], groups: ParallelGroups
) -> dict[str, Tensor]:
    """``tensors`` with every expert slice (not a scalar) wrapped as a global DTensor."""
    if groups.mesh is None:
        raise ValueError("DCP checkpoints need the device mesh of build_groups")
    return {
        key: _global(value, groups)
        if is_expert(key) and value.ndim > 0 and not isinstance(value, DTensor)
        else value
        for key, value in tensors.items()
    }


def save(path: Path, tensors: dict[str, Tensor], is_expert: Callable[[str], bool], groups) -> None:
    """Write this rank's part of ``tensors`` into DCP directory ``path`` (every rank calls)."""
    dcp.save(distributed_state(tensors, is_expert, groups), checkpoint_id=str(path))


@torch.no_grad()
def load_in_place(
    path: Path, tensors: dict[str, Tensor], is_expert: Callable[[str], bool], groups
) -> None:
    """Fill this rank's live ``tensors`` (views of its parameters, buffers and optimizer state)
    from DCP directory ``path``, whatever layout wrote it (every rank calls)."""
    state = distributed_state(tensors, is_expert, groups)
    dcp.load(state, checkpoint_id=str(path))
    for key, target in tensors.items():
        loaded = state[key]
        if loaded is not target:  # a wrapped expert slice: make sure the rows land in place
            target.copy_(loaded.to_local() if isinstance(loaded, DTensor) else loaded)


def specs(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Key -> (dtype, global shape) of every tensor in DCP directory ``path``."""
    metadata = FileSystemReader(str(path)).read_metadata()
    out = {}
    for key, item in metadata.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata):
            out[key] = (item.properties.dtype, tuple(item.size))
    return out


def read_full(path: Path, key: str, spec: tuple[torch.dtype, tuple[int, ...]]) -> Tensor:
    """One tensor of DCP directory ``path`` at its global shape, read in this process only."""
    dtype, shape = spec
    out = {key: torch.empty(shape, dtype=dtype)}
    with warnings.catch_warnings():  # "loading in a single process" is the point here
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(out, checkpoint_id=str(path), no_dist=True)
    return out[key]
