"""Expert-parallel + data-parallel training on torch.distributed (nccl on GPUs, gloo on CPU).

Building blocks: :func:`shard_moe_experts` (each rank keeps E/N experts, tokens move by
all-to-all), :func:`sync_gradients` / :func:`clip_grad_norm` (data-parallel gradients equal to the
single-process ones on the global batch), sharded checkpoints that re-shard to any N dividing E
(:func:`save_sharded`, :func:`load_sharded`, :func:`gather_checkpoint`). The torchrun entry point
is ``python -m visionmoe.distributed.train`` (not imported here, so ``-m`` runs it cleanly).
"""

from visionmoe.distributed.checkpoint import (
    gather_checkpoint,
    gather_full_state,
    load_sharded,
    load_sharded_tensors,
    read_layout,
    save_merged_checkpoint,
    save_sharded,
)
from visionmoe.distributed.data_parallel import (
    broadcast_parameters,
    clip_grad_norm,
    mean_over_ranks,
    sync_gradients,
)
from visionmoe.distributed.expert_parallel import (
    ExpertParallelExperts,
    all_to_all,
    expert_range,
    shard_moe_experts,
)
from visionmoe.distributed.groups import (
    ParallelGroups,
    build_groups,
    check_expert_parallel,
    init_distributed,
)

__all__ = [
    "ExpertParallelExperts",
    "ParallelGroups",
    "all_to_all",
    "broadcast_parameters",
    "build_groups",
    "check_expert_parallel",
    "clip_grad_norm",
    "expert_range",
    "gather_checkpoint",
    "gather_full_state",
    "init_distributed",
    "load_sharded",
    "load_sharded_tensors",
    "mean_over_ranks",
    "read_layout",
    "save_merged_checkpoint",
    "save_sharded",
    "shard_moe_experts",
    "sync_gradients",
]
