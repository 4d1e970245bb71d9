"""Expert-parallel + data-parallel training on torch.distributed (nccl on GPUs, gloo on CPU).

Building blocks: a ``("dp", "ep")`` device mesh (:func:`build_groups`), :func:`shard_moe_experts`
(each rank keeps E/N experts, tokens move by all-to-all), :func:`wrap_data_parallel` (the dense
part under DDP or FSDP2) with :func:`reduce_expert_gradients` / :func:`clip_grad_norm`
(gradients equal to the single-process ones on the global batch), :func:`evaluate_sharded`, and
sharded checkpoints that re-shard to any N dividing E (:func:`save_sharded`,
:func:`restore_sharded`, :func:`load_sharded`, :func:`gather_checkpoint`,
:func:`export_merged`). The torchrun entry point is ``python -m visionmoe.distributed.train``
(not imported here, so ``-m`` runs it cleanly).
"""

from visionmoe.distributed.checkpoint import (
    ShardedReader,
    gather_checkpoint,
    load_sharded,
    load_sharded_tensors,
    read_layout,
    restore_sharded,
    save_sharded,
)
from visionmoe.distributed.data_parallel import (
    broadcast_parameters,
    clip_grad_norm,
    mean_over_ranks,
    reduce_expert_gradients,
    unwrap,
    wrap_data_parallel,
)
from visionmoe.distributed.evaluate import evaluate_sharded
from visionmoe.distributed.expert_parallel import (
    ExpertParallelExperts,
    all_to_all,
    expert_range,
    shard_moe_experts,
)
from visionmoe.distributed.export import export_merged
from visionmoe.distributed.groups import (
    ParallelGroups,
    build_groups,
    check_expert_parallel,
    init_distributed,
)

__all__ = [
    "ExpertParallelExperts",
    "ParallelGroups",
    "ShardedReader",
    "all_to_all",
    "broadcast_parameters",
    "build_groups",
    "check_expert_parallel",
    "clip_grad_norm",
    "evaluate_sharded",
    "expert_range",
    "export_merged",
    "gather_checkpoint",
    "init_distributed",
    "load_sharded",
    "load_sharded_tensors",
    "mean_over_ranks",
    "read_layout",
    "reduce_expert_gradients",
    "restore_sharded",
    "save_sharded",
    "shard_moe_experts",
    "unwrap",
    "wrap_data_parallel",
]
