"""Starting torch.distributed and laying expert parallelism out over the ranks.

The W ranks form a 2-D :class:`~torch.distributed.device_mesh.DeviceMesh` of shape (W/N, N) with
axes ``("dp", "ep")`` (N = ``expert_parallel``). Along ``ep`` each rank of a row holds E/N experts
and tokens move by all-to-all; the W/N rows are data-parallel replicas of each other, and the
ranks of a ``dp`` column hold the same expert slice. With N = W (the default) every rank holds a
different expert slice; with N = 1 experts are replicated and training is plain data
parallelism. Consecutive ranks share a row so that, on several nodes, the all-to-all stays inside
a node when N <= GPUs per node.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from visionmoe.runtime import configure_backends

# Generous: long data loading or a checkpoint write must not kill a healthy job.
DEFAULT_TIMEOUT_S = 1800.0
MESH_AXES = ("dp", "ep")


@dataclass(frozen=True)
class ParallelGroups:
    """Who talks to whom.

    Attributes:
      world_size, rank: W and this process's global rank.
      expert_parallel: N, ranks sharing one set of E experts.
      expert_group: the N ranks of this rank's expert-parallel group (all-to-all), or None when
        N = 1 (nothing to exchange).
      replica_group: the W/N ranks holding the same expert slice (their expert gradients are
        summed), or None when N = W.
      device: where this rank computes.
      mesh: the (W/N, N) device mesh with axes ``("dp", "ep")`` whose groups these are.
    """

    world_size: int
    rank: int
    expert_parallel: int
    expert_group: ProcessGroup | None
    replica_group: ProcessGroup | None
    device: torch.device
    mesh: DeviceMesh | None = None

    @property
    def expert_rank(self) -> int:
        """Position in the expert-parallel group: which expert slice this rank holds."""
        return self.rank % self.expert_parallel

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def writes_expert_shard(self) -> bool:
        """Only the first replica writes expert shards: the other replicas hold copies."""
        return self.rank < self.expert_parallel


def check_expert_parallel(num_experts: int, expert_parallel: int, world_size: int) -> None:
    """Refuse layouts that cannot hold an equal expert slice per rank, before any work."""
    if expert_parallel < 1 or world_size % expert_parallel:
        raise ValueError(
            f"expert parallelism {expert_parallel} must divide the world size {world_size}"
        )
    if num_experts % expert_parallel:
        raise ValueError(
            f"{num_experts} experts cannot be split evenly over {expert_parallel} expert-parallel "
            f"ranks; pick a world size (or --expert-parallel) that divides {num_experts}"
        )


def free_port() -> int:
    """A currently free loopback port, for single-process runs and tests."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(
    timeout_s: float = DEFAULT_TIMEOUT_S, backend: str | None = None
) -> torch.device:
    """Join the process group described by torchrun's environment; returns this rank's device.

    Without torchrun's variables the process joins a world of one on loopback, so the same entry
    point runs unlaunched. The timeout bounds every collective: a rank that dies or hangs makes
    the others fail within it instead of waiting forever. With NCCL, asynchronous error handling
    is what turns a stuck collective into an error, so it is switched on unless the user chose.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    backend = backend or default_backend()
    device = torch.device("cpu")
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    configure_backends(device)
    return device


def build_groups(
    expert_parallel: int | None = None, device: torch.device | None = None
) -> ParallelGroups:
    """Build the (W/N, N) device mesh and take its groups (every rank must call this, in step)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    n = world if expert_parallel is None else expert_parallel
    if n < 1 or world % n:
        raise ValueError(f"expert parallelism {n} must divide the world size {world}")
    device = device or torch.device("cpu")
    # Row-major: rank = row * N + column, so an expert-parallel row is N consecutive ranks.
    mesh = init_device_mesh(device.type, (world // n, n), mesh_dim_names=MESH_AXES)
    expert_group = mesh.get_group("ep") if n > 1 else None
    replica_group = mesh.get_group("dp") if world // n > 1 else None
    return ParallelGroups(world, rank, n, expert_group, replica_group, device, mesh)
