"""Per-rank programs for the distributed tests, run as ``python _workers.py MODE ...``.

Each rank computes its single-process reference itself (same seed, whole global batch), so a
worker only reports differences; the test asserts on the JSON it writes.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch


def _setup(expert_parallel: int | None = None, timeout_s: float = 60.0):
    from visionmoe.distributed import build_groups, init_distributed

    torch.set_num_threads(1)
    device = init_distributed(timeout_s, "gloo")
    return build_groups(expert_parallel, device)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def _experiment(model_config, grad_clip, optimizer, grad_accum=1):
    from visionmoe.train.config import (
        DataConfig,
        ExperimentConfig,
        OptimConfig,
        ScheduleConfig,
        TrainConfig,
    )

    return ExperimentConfig(
        name="ep-test",
        model=model_config,
        data=DataConfig(),
        optim=OptimConfig(name=optimizer, lr=1e-2, weight_decay=0.1, grad_clip=grad_clip),
        schedule=ScheduleConfig(warmup_steps=0),
        train=TrainConfig(label_smoothing=0.1, batch_size=8, grad_accum=grad_accum),
    )


# name -> (model, overrides, grad_clip, optimizer). Tight top-k capacity (5 slots for 34
# assignments per one-image group) drops tokens. Adam runs with eps=1e-3: with the default 1e-8 it
# maps rounding-level gradients (e.g. the key biases, exactly 0 in exact arithmetic) to full-size
# +-lr steps, so any change of summation order, distributed or not, moves weights by ~lr.
CASES = {
    "top_k": (
        "vmoe_debug",
        dict(num_experts=4, group_images=1, capacity_factor=0.5, capacity_multiple_of=None),
        0.05,
        "adamw",
    ),
    "bpr": (
        "vmoe_debug",
        dict(
            num_experts=4,
            group_images=1,
            capacity_factor=0.5,
            capacity_multiple_of=None,
            batch_priority=True,
        ),
        None,
        "sgd",
    ),
    "expert_choice": ("ecmoe_debug", dict(capacity_factor=0.75), 0.05, "sgd"),
    "soft": ("softmoe_debug", {}, 1.0, "adamw"),
}


def _optimizer(model, config):
    from visionmoe.distributed.data_parallel import split_sharded_groups
    from visionmoe.train.optim import build_optimizer

    optimizer = split_sharded_groups(build_optimizer(model, config.optim))
    for group in optimizer.param_groups:
        if "eps" in group:
            group["eps"] = 1e-3
    return optimizer


def _full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor from an FSDP2 shard (a collective: every rank calls it in step)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _equivalence_case(name: str, groups, dense: str, steps: int = 2, accum: int = 1) -> dict:
    """Run ``steps`` steps single-process (reference) and expert-parallel with the dense part
    under ``dense`` (DDP or FSDP2), ``accum`` micro-batches per step; report max diffs."""
    from visionmoe.distributed import expert_range, shard_moe_experts, wrap_data_parallel
    from visionmoe.distributed.expert_parallel import expert_parameter_names
    from visionmoe.distributed.train import distributed_train_step
    from visionmoe.models import create_model
    from visionmoe.train.loop import train_step

    model_name, overrides, clip, optimizer = CASES[name]
    torch.manual_seed(0)
    # noise_std=0: router noise comes from each rank's RNG, which cannot reproduce the draws one
    # process makes for the whole batch; dropout is 0 in the debug models for the same reason.
    model = create_model(model_name, noise_std=0.0, **overrides)
    config = _experiment(model.config, clip, optimizer, accum)
    reference = copy.deepcopy(model)
    ref_opt = _optimizer(reference, config)
    if groups.expert_parallel > 1:
        shard_moe_experts(model, groups.expert_group)
    trained = wrap_data_parallel(model, groups, dense)
    opt = _optimizer(model, config)
    experts = expert_parameter_names(model)
    share = config.train.batch_size // groups.world_size
    local = slice(groups.rank * share, (groups.rank + 1) * share)
    report: dict[str, float] = {
        "dtensor_params": sum(type(p).__name__ == "DTensor" for p in model.parameters())
    }

    def note(key: str, value: float) -> None:
        report[key] = max(report.get(key, 0.0), value)

    def mine(name: str, full: torch.Tensor) -> torch.Tensor:
        if name not in experts or groups.expert_parallel == 1:
            return full
        start, stop = expert_range(full.shape[0], groups.expert_parallel, groups.expert_rank)
        return full[start:stop]

    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(config.train.batch_size, 3, 32, 32, generator=generator)
        y = torch.randint(0, 10, (config.train.batch_size,), generator=generator)
        reference.train()
        model.train()
        with torch.no_grad():
            note("logits", _max_diff(trained(x[local]), reference(x)[local]))
        ref_metrics = train_step(reference, ref_opt, x, y, config)
        metrics = distributed_train_step(trained, opt, x[local], y[local], config, groups)
        for key in ("train/loss", "train/task_loss", "train/aux_loss", "train/grad_norm"):
            note(key, abs(ref_metrics[key] - metrics[key]))
        ref_params = dict(reference.named_parameters())
        for pname, param in model.named_parameters():
            grad, weight = _full(param.grad), _full(param.detach())
            note("grads", _max_diff(grad, mine(pname, ref_params[pname].grad)))
            note("weights", _max_diff(weight, mine(pname, ref_params[pname].detach())))
        dropped = [v for k, v in ref_metrics.items() if k.endswith("assignments_dropped_frac")]
        note("ref_dropped_frac", max(dropped, default=0.0))
        note("aux_loss", ref_metrics["train/aux_loss"])
        note("grad_norm", ref_metrics["train/grad_norm"])
    return report


def equivalence(args) -> None:
    from visionmoe.distributed import build_groups

    groups = _setup()
    # Fewer expert-parallel ranks than ranks: experts replicated over W/N groups (N=1: pure DP).
    hybrid = 2 if groups.world_size == 4 else 1
    hybrid_groups = build_groups(hybrid, groups.device)
    results = {}
    for dense in ("ddp", "fsdp"):
        for name in CASES:
            results[f"{dense}/{name}"] = _equivalence_case(name, groups, dense)
        case = _equivalence_case("top_k", hybrid_groups, dense)
        results[f"{dense}/top_k_ep{hybrid}"] = case
        # Two micro-batches per step: gradients synchronise on the last backward only.
        results[f"{dense}/top_k_accum2"] = _equivalence_case("top_k", groups, dense, accum=2)
    if args.run:
        results["reshard"] = _reshard_report(args.run, groups)
    if args.fsdp_run:
        results["fsdp_reshard"] = _fsdp_restore_report(args.fsdp_run, groups)
    Path(args.out, f"rank{groups.rank}.json").write_text(json.dumps(results))
    # A world size that does not divide E is refused, and the model is left as it was.
    from visionmoe.distributed import shard_moe_experts
    from visionmoe.models import create_model

    model = create_model("vmoe_debug", num_experts=3, top_k=1)
    try:
        shard_moe_experts(model)
    except ValueError as err:
        assert "3 experts" in str(err) and str(groups.world_size) in str(err), err
        assert model.blocks[1].ffn.experts.w1.shape[0] == 3
    else:
        raise AssertionError("3 experts over an even world size must be refused")


def _reshard_report(run: str, groups) -> dict:
    """Re-shard a run's checkpoint to this world size; compare with the merged single model."""
    from visionmoe.distributed import gather_checkpoint, load_sharded, read_layout
    from visionmoe.distributed.expert_parallel import shard_moe_experts
    from visionmoe.models.vit import VisionTransformer
    from visionmoe.train.config import ExperimentConfig
    from visionmoe.train.run import load_run

    config = ExperimentConfig.from_dict(read_layout(run)["config"])
    full = VisionTransformer(config.model)
    full.load_state_dict(gather_checkpoint(run))
    merged, _ = load_run(run)
    sharded = VisionTransformer(config.model)
    shard_moe_experts(sharded, groups.expert_group)
    sharded.load_state_dict(load_sharded(run, groups.world_size, groups.rank))
    full.eval()
    sharded.eval()
    # Every rank its own images: the all-to-all really mixes different tokens.
    generator = torch.Generator().manual_seed(100 + groups.rank)
    m = config.model
    x = torch.rand(8, m.in_chans, m.image_size, m.image_size, generator=generator) * 2 - 1
    with torch.no_grad():
        expected = full(x)
        return {
            "local_experts": sharded.blocks[1].ffn.experts.w1.shape[0],
            "sharded_vs_full": _max_diff(sharded(x), expected),
            "merged_vs_full": _max_diff(merged(x), expected),
        }


def _fsdp_restore_report(run: str, groups) -> dict:
    """Restore a 2-rank FSDP2 run's DCP checkpoint at this world size (DCP re-shards both the
    dense DTensors and the expert rows); compare with the checkpoint read in one process."""
    from visionmoe.distributed import (
        ShardedReader,
        expert_range,
        read_layout,
        restore_sharded,
        shard_moe_experts,
        wrap_data_parallel,
    )
    from visionmoe.distributed.data_parallel import split_sharded_groups
    from visionmoe.distributed.expert_parallel import expert_parameter_names
    from visionmoe.models.vit import VisionTransformer
    from visionmoe.train.config import ExperimentConfig
    from visionmoe.train.optim import build_optimizer

    config = ExperimentConfig.from_dict(read_layout(run)["config"])
    model = VisionTransformer(config.model)
    shard_moe_experts(model, groups.expert_group)
    wrap_data_parallel(model, groups, "fsdp")
    optimizer = split_sharded_groups(build_optimizer(model, config.optim))
    restore_sharded(run, model, optimizer, groups)
    reader = ShardedReader(run)
    experts = expert_parameter_names(model)
    report = {"weights": 0.0, "exp_avg": 0.0, "step": 0.0}
    for name, param in model.named_parameters():
        full = reader.read(f"model/{name}")
        slot = reader.read(f"optim/{name}/exp_avg")
        if name in experts:
            start, stop = expert_range(full.shape[0], groups.expert_parallel, groups.expert_rank)
            full, slot = full[start:stop], slot[start:stop]
        state = optimizer.state[param]
        report["weights"] = max(report["weights"], _max_diff(_full(param.detach()), full))
        report["exp_avg"] = max(report["exp_avg"], _max_diff(_full(state["exp_avg"]), slot))
        step = float(state["step"]) - float(reader.read(f"optim/{name}/step"))
        report["step"] = max(report["step"], abs(step))
    report["local_experts"] = model.blocks[1].ffn.experts.w1.shape[0]
    return report


def fault(args) -> None:
    """The real entry point, with rank ``args.rank`` dying or hanging at step ``args.step``."""
    import visionmoe.distributed.train as entry

    rank = int(os.environ["RANK"])
    if rank == args.rank:
        real = entry.distributed_train_step_device
        calls = {"n": 0}

        def faulty(*a, **kw):
            if calls["n"] == args.step:
                Path(args.out, "fault_time").write_text(str(time.time()))
                if args.kind == "exit":
                    os._exit(3)
                time.sleep(3600)
            calls["n"] += 1
            return real(*a, **kw)

        entry.distributed_train_step_device = faulty
    entry.cli(args.train_args)


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("equivalence")
    p.add_argument("--out", required=True)
    p.add_argument("--run", help="also load this run's sharded checkpoint at this world size")
    p.add_argument("--fsdp-run", help="also restore this FSDP2 run's DCP checkpoint")
    p = sub.add_parser("fault")
    p.add_argument("--kind", choices=("exit", "hang"), required=True)
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--step", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument("train_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.mode == "fault":
        args.train_args = [a for a in args.train_args if a != "--"]
        fault(args)
    equivalence(args)
    import torch.distributed as dist

    dist.destroy_process_group()
    sys.exit(0)


if __name__ == "__main__":
    main()
