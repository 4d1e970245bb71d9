"""Sharded checkpoints of expert-parallel runs, and re-sharding them to any world size.

Layout of a run directory trained with :mod:`visionmoe.distributed.train`::

    sharded/step_0000500/
        layout.json                          world size, expert parallelism N, expert ranges,
                                             SHA-256 of every file, the run config
        replicated.safetensors               rank 0: every non-expert tensor + its optimizer state
        experts-rank{r}-of-{N}.safetensors   rank r < N: its expert slices + their optimizer state
        rng.safetensors                      each rank's torch RNG state (exact resume at equal W)
    sharded/latest                           name of the newest complete sharded checkpoint
    checkpoints/step_.../                    the merged single-process checkpoint (standard format,
                                             optional: :mod:`visionmoe.distributed.export`)

With the dense part under FSDP2 (``parallel.dense="fsdp"``) the state is DTensor-sharded and a
checkpoint directory holds, instead of the safetensors files, what ``torch.distributed.checkpoint``
writes (``.metadata`` + ``__*.distcp``; :mod:`visionmoe.distributed.dcp`), with the same
``layout.json`` and ``rng.safetensors`` beside it. Both kinds re-shard to any layout and read
back in one process, one tensor at a time (:class:`ShardedReader`).

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
from torch.distributed.tensor import DTensor

from visionmoe.distributed import dcp as dcp_files
from visionmoe.distributed.expert_parallel import expert_modules, expert_range
from visionmoe.distributed.groups import ParallelGroups
from visionmoe.train.checkpoint import CheckpointError, _fsync_dir, _sha256, atomic_write_text

SHARDED_DIR = "sharded"
LAYOUT_FORMAT = "visionmoe-sharded-v1"
DCP_FORMAT = "visionmoe-dcp-v1"  # the same layout.json; tensors written by DCP
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
    """Write sharded checkpoint ``step`` (every rank calls this); keep the newest ``keep``.

    ``model`` is the bare model (not a DDP wrapper). State holding DTensors (FSDP2) is written
    with DCP, anything else as the safetensors shards described above.
    """
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
    use_dcp = any(isinstance(v, DTensor) for v in tensors.values())
    written: dict[str, str] = {}
    if use_dcp:
        dcp_files.save(tmp, tensors, lambda key: _is_expert_key(key, experts), groups)
    else:
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
        if use_dcp:
            hashes.update({f.name: _sha256(f) for f in sorted(tmp.iterdir()) if f.is_file()})
        rngs = {f"rank{r}": state for r, (_, state) in enumerate(gathered)}
        hashes[RNG_FILE] = _write(tmp / RNG_FILE, rngs)
        missing = [f for f in hashes if not (tmp / f).is_file()]
        if missing:
            raise CheckpointError(
                f"sharded checkpoint files {missing} written by other ranks are not visible in "
                f"{tmp}; multi-node runs need run_dir on a shared filesystem"
            )
        layout = {
            "format": DCP_FORMAT if use_dcp else LAYOUT_FORMAT,
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
    if layout.get("format") not in (LAYOUT_FORMAT, DCP_FORMAT):
        raise CheckpointError(f"{ckpt}: unsupported sharded format {layout.get('format')!r}")
    layout["path"] = str(ckpt)
    return layout


def _verify(ckpt: Path, filename: str, layout: dict) -> Path:
    file = ckpt / filename
    if not file.is_file():
        raise CheckpointError(f"checkpoint file {file} is missing")
    if _sha256(file) != layout["sha256"].get(filename):
        raise CheckpointError(
            f"checkpoint file {file} is truncated or corrupted (SHA-256 does not match "
            "layout.json); refusing to load it"
        )
    return file


class ShardedReader:
    """Random access to the tensors of a sharded checkpoint, one tensor at a time.

    ``read(key, world_size, rank)`` returns the tensor as expert-parallel rank ``rank`` of
    ``world_size`` holds it (expert slices re-cut from whatever N wrote them; any
    ``world_size`` dividing the layer's expert count), 1 giving the single-process tensor.
    Files are checked against ``layout.json``'s SHA-256 once, before their first read.
    """

    def __init__(self, path: str | os.PathLike):
        self.layout = read_layout(path)
        self.path = Path(self.layout["path"])
        self.is_dcp = self.layout["format"] == DCP_FORMAT
        self._verified: set[str] = set()
        if self.is_dcp:
            for filename in self.layout["sha256"]:
                if filename != RNG_FILE:
                    self._file(filename)
            self._specs = dcp_files.specs(self.path)
            return
        self._specs = {}
        N = self.layout["expert_parallel"]
        for source, filename in [(None, REPLICATED_FILE)] + [
            (r, expert_file(r, N)) for r in range(N)
        ]:
            with safe_open(str(self._file(filename)), "pt") as f:
                for key in f.keys():
                    piece = f.get_slice(key)
                    shape = tuple(piece.get_shape())
                    dtype = _DTYPES[piece.get_dtype()]
                    if source is not None and shape and key in self._specs:
                        old = self._specs[key][1]
                        shape = (old[0] + shape[0], *shape[1:])
                    self._specs[key] = (dtype, shape)

    def _file(self, filename: str) -> Path:
        if filename not in self._verified:
            _verify(self.path, filename, self.layout)
            self._verified.add(filename)
        return self.path / filename

    def specs(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Key -> (dtype, single-process shape), for every ``model/`` and ``optim/`` tensor."""
        return dict(self._specs)

    def _expert_layer(self, key: str) -> dict | None:
        return self.layout["experts"].get(_param_name(key).rsplit(".", 1)[0])

    def read(self, key: str, world_size: int = 1, rank: int = 0) -> Tensor:
        layer = self._expert_layer(key)
        if self.is_dcp:
            full = dcp_files.read_full(self.path, key, self._specs[key])
            if layer is None or full.ndim == 0:
                return full
            start, stop = expert_range(layer["num_experts"], world_size, rank)
            return full[start:stop].clone()
        if layer is None:
            with safe_open(str(self._file(REPLICATED_FILE)), "pt") as f:
                return f.get_tensor(key)
        start, stop = expert_range(layer["num_experts"], world_size, rank)
        parts = []
        for source, (lo, hi) in enumerate(layer["ranges"]):
            if lo >= stop or hi <= start:
                continue
            filename = expert_file(source, self.layout["expert_parallel"])
            with safe_open(str(self._file(filename)), "pt") as f:
                if not self._specs[key][1]:  # a per-parameter scalar such as Adam's step count
                    return f.get_tensor(key)
                parts.append(f.get_slice(key)[max(start, lo) - lo : min(stop, hi) - lo])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def rng(self, rank: int) -> Tensor:
        return load_file(str(self._file(RNG_FILE)))[f"rank{rank}"]


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def load_sharded_tensors(
    path: str | os.PathLike, world_size: int = 1, rank: int = 0
) -> dict[str, Tensor]:
    """Every ``model/`` and ``optim/`` tensor of expert-parallel rank ``rank`` of ``world_size``.

    Reads only the expert rows that overlap the wanted slice, whatever N the run was saved
    with: any ``world_size`` dividing every layer's expert count works, 1 giving the full model.
    """
    reader = ShardedReader(path)
    return {key: reader.read(key, world_size, rank) for key in sorted(reader.specs())}


def load_sharded(path: str | os.PathLike, world_size: int = 1, rank: int = 0) -> dict[str, Tensor]:
    """Model state dict for expert-parallel rank ``rank`` of ``world_size`` (re-sharded)."""
    reader = ShardedReader(path)
    return {
        key.removeprefix("model/"): reader.read(key, world_size, rank)
        for key in sorted(reader.specs())
        if key.startswith("model/")
    }


def gather_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """The single-process model state dict of a sharded checkpoint (all experts merged).

    Reads one tensor at a time and never the optimizer state: memory is the model once.
    """
    return load_sharded(path, 1, 0)


def load_rng(path: str | os.PathLike, rank: int) -> Tensor:
    return ShardedReader(path).rng(rank)


@torch.no_grad()
def restore_sharded(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    groups: ParallelGroups,
) -> dict:
    """Load a sharded checkpoint into this rank's (bare, possibly FSDP2) model and optimizer,
    re-sharding to the current layout; every rank calls this. Returns the layout."""
    layout = read_layout(path)
    live = training_tensors(model, optimizer)
    sharded_state = any(isinstance(v, DTensor) for v in live.values())
    if sharded_state != (layout["format"] == DCP_FORMAT):
        kinds = {True: "FSDP2 (parallel.dense=fsdp)", False: "replicated (parallel.dense=ddp)"}
        raise CheckpointError(
            f"{layout['path']} holds a {kinds[not sharded_state]} dense part; this run's dense "
            f"part is {kinds[sharded_state]}: resume with the setting the run was saved with"
        )
    if sharded_state:
        init_optimizer_state(optimizer)
        experts = expert_modules(model)
        live = training_tensors(model, optimizer)
        dcp_files.load_in_place(
            Path(layout["path"]), live, lambda k: _is_expert_key(k, experts), groups
        )
        return layout
    tensors = load_sharded_tensors(path, groups.expert_parallel, groups.expert_rank)
    model.load_state_dict(
        {k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")}
    )
    load_optimizer_tensors(model, optimizer, tensors)
    return layout


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's per-parameter state (so DCP has tensors to load into) with a
    zero-learning-rate step on zero gradients, which leaves every parameter unchanged."""
    if optimizer.state:
        return
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
