"""Expert-parallel + data-parallel training, launched by torchrun (one process per device).

    torchrun --nproc-per-node 4 -m visionmoe.distributed.train --recipe digits_vmoe

Every rank takes its contiguous B/W slice of each global batch (the batch the single-process loop
would use at that step), routes it with its replica of the routers and sends expert buffers to the
ranks owning the experts (:mod:`visionmoe.distributed.expert_parallel`). The schedule, loss,
optimizer and batch order are those of :mod:`visionmoe.train.loop`; only the gradient handling
differs: the dense part trains under DDP or FSDP2 (``parallel.dense``), the experts' gradients are
reduced over the data-parallel axis of the device mesh (:mod:`visionmoe.distributed.data_parallel`).
Rank 0 alone writes logs and the run directory's shared files; every rank writes its part of the
sharded checkpoints. At the end the newest one is exported as a standard single-process checkpoint
(``parallel.merged_checkpoint``; by default only while the state is small), so
``visionmoe eval/sweep/inspect RUN`` work unchanged; ``python -m visionmoe.distributed.export RUN``
writes it later.

Evaluation is sharded: each rank evaluates 1/W of the test set and the sums are reduced
(:mod:`visionmoe.distributed.evaluate`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from visionmoe.data import ImageSource
from visionmoe.distributed.checkpoint import load_rng, read_layout, restore_sharded, save_sharded
from visionmoe.distributed.data_parallel import (
    broadcast_parameters,
    clip_grad_norm,
    mean_over_ranks,
    reduce_expert_gradients,
    split_sharded_groups,
    unwrap,
    wrap_data_parallel,
)
from visionmoe.distributed.evaluate import eval_plan, evaluate_sharded
from visionmoe.distributed.expert_parallel import shard_moe_experts
from visionmoe.distributed.export import count_parameters, export_merged, wants_merged
from visionmoe.distributed.groups import (
    DEFAULT_TIMEOUT_S,
    ParallelGroups,
    build_groups,
    check_expert_parallel,
    init_distributed,
)
from visionmoe.loading import load_state
from visionmoe.models.registry import apply_overrides
from visionmoe.models.vit import VisionTransformer
from visionmoe.train.checkpoint import (
    CheckpointError,
    atomic_write_text,
)
from visionmoe.train.config import ExperimentConfig
from visionmoe.train.finetune import load_init_weights
from visionmoe.train.hooks import MetricsLog
from visionmoe.train.inputs import TrainStream, eval_stream, load_splits
from visionmoe.train.loop import TrainState, is_log_step
from visionmoe.train.metrics import MetricsWindow
from visionmoe.train.optim import build_optimizer, learning_rate, set_learning_rate
from visionmoe.train.rundir import default_run_dir, initial_config, truncate_metrics
from visionmoe.train.step import to_floats, train_step_device

# Per-rank router-noise / dropout streams: rank 0 keeps the single-process stream.
_RANK_SEED_STRIDE = 1_000_003


def check_layout(config: ExperimentConfig, world_size: int, expert_parallel: int | None) -> list:
    """Refuse what cannot run before any work; return notes on what changes vs one process."""
    if getattr(config, "text", None) is not None:
        raise ValueError(
            "distributed training covers image classification runs; image-text (LIMoE) runs "
            "train in one process (visionmoe train)"
        )
    batch = config.train.batch_size
    if batch % world_size:
        raise ValueError(
            f"train.batch_size={batch} must be divisible by the world size {world_size} "
            "(every rank takes an equal slice of each global batch)"
        )
    accum = config.train.grad_accum
    if (batch // world_size) % accum:
        raise ValueError(
            f"train.grad_accum={accum} must divide each rank's share of the batch "
            f"({batch} / {world_size} = {batch // world_size} images)"
        )
    n = world_size if expert_parallel is None else expert_parallel
    moe = config.model.moe if config.model.moe_layers else None
    check_expert_parallel(moe.num_experts if moe else n, n, world_size)
    notes = []
    if moe is not None:
        local_tokens = batch // world_size * config.model.num_tokens
        if moe.group_size is not None:
            group = moe.group_size
        elif moe.group_images is not None:
            group = moe.group_images * config.model.num_tokens
        else:
            group = None
        if group is None or local_tokens % group:
            notes.append(
                f"routing groups ({group or 'whole batch'} tokens) do not tile the {local_tokens} "
                "tokens of a rank's batch: routing differs from single-process training"
            )
    return notes


def distributed_train_step_device(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    config: ExperimentConfig,
    groups: ParallelGroups,
) -> dict[str, torch.Tensor]:
    """One step on this rank's slice; the update equals the single-process one on the batch.

    ``model`` is what :func:`~visionmoe.distributed.data_parallel.wrap_data_parallel` returned
    (DDP or FSDP2 averages the dense gradients during the backward). Metrics are this rank's,
    as 0-dim device tensors (``train/grad_norm`` is already global); nothing is read back.
    """

    def sync_and_clip(module: torch.nn.Module, max_norm: float | None) -> torch.Tensor:
        reduce_expert_gradients(module, groups)
        return clip_grad_norm(module, max_norm, groups)

    return train_step_device(model, optimizer, x, y, config, clip_fn=sync_and_clip)


def distributed_train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    config: ExperimentConfig,
    groups: ParallelGroups,
) -> dict[str, float]:
    """:func:`distributed_train_step_device` with the metrics averaged over ranks and read back
    as floats (one all-reduce and one host sync)."""
    metrics = distributed_train_step_device(model, optimizer, x, y, config, groups)
    return to_floats(_over_ranks(metrics, groups))


def _over_ranks(metrics: dict[str, torch.Tensor], groups: ParallelGroups) -> dict:
    """Means over ranks on the device; the gradient norm, already global, is kept as it is."""
    norm = "train/grad_norm"
    out = mean_over_ranks({k: v for k, v in metrics.items() if k != norm}, groups)
    return {**out, norm: metrics[norm]} if norm in metrics else out


def _agree(value):
    """Rank 0's ``value`` on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _with_dataset_classes(config: ExperimentConfig, num_classes: int) -> ExperimentConfig:
    if num_classes == config.model.num_classes:
        return config
    model = apply_overrides(config.model, num_classes=num_classes)
    return ExperimentConfig(**{**config.__dict__, "model": model})


def _evaluate(
    model: torch.nn.Module,
    test: ImageSource,
    name: str,
    state: TrainState,
    log: MetricsLog | None,
    groups: ParallelGroups,
) -> dict:
    """Every rank scores its block of the test set, read by its own loader (sharded eval)."""
    config, (n, world, rank) = state.config, (len(test), groups.world_size, groups.rank)
    local, _ = eval_plan(n, config.train.eval_batch_size, world)
    stream = partial(eval_stream, config, test, device=groups.device)
    batches = stream(batch_size=local, rank=rank, world_size=world)
    # A rank whose block is empty (fewer images than ranks) pads with the first test image.
    empty = ((rank + 1) * n) // world == (rank * n) // world
    blank = next(iter(stream(batch_size=1))) if empty and n else None
    result = evaluate_sharded(
        unwrap(model),
        batches,
        n,
        config.train.eval_batch_size,
        groups,
        config.train.precision,
        blank,
    )
    out = {f"eval/{name}/{k}": v for k, v in result.items()}
    if log is not None:
        log.write({"step": state.step, **out})
        if log.bar is not None:
            log.bar.write(f"step {state.step}: test accuracy {result['accuracy']:.4f}")
    return out


def train_distributed(
    config: ExperimentConfig | None,
    groups: ParallelGroups,
    run_dir: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    init: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Train (or resume) on every rank of ``groups``; returns the summary (complete on rank 0).

    Resuming works at any world size whose expert parallelism divides the expert count (the
    sharded checkpoint is re-sliced); the RNG streams resume exactly only at the saved layout.
    """
    layout = None
    if resume is not None:
        run_dir = Path(resume)
        saved = ExperimentConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
        config = saved if config is None else config
        try:
            layout = read_layout(run_dir)
        except CheckpointError:
            if (run_dir / "sharded" / "latest").exists():
                raise
    if config is None:
        raise ValueError("train_distributed needs a config or a run to resume")
    notes = check_layout(config, groups.world_size, groups.expert_parallel)
    if groups.is_main and run_dir is None:
        run_dir = default_run_dir(config.name)
    run_dir = Path(_agree(str(run_dir) if run_dir is not None else None))
    if groups.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    torch.manual_seed(config.train.seed)

    splits = load_splits(config.data)
    config = _with_dataset_classes(config, splits.train.num_classes)
    # Each rank reads only its share of every batch (and of the test set) with its own loader.
    train_data = TrainStream(
        config,
        splits.train,
        device=groups.device,
        rank=groups.rank,
        world_size=groups.world_size,
    )
    if groups.is_main:
        atomic_write_text(run_dir / "config.json", config.to_json())
        atomic_write_text(run_dir / "classes.json", json.dumps(splits.train.class_names))

    model = VisionTransformer(config.model)
    init_notes: list[str] = []
    if init is not None and layout is None:
        init_notes = load_init_weights(model, load_state(init))
    model.to(groups.device)
    if groups.expert_parallel > 1:
        shard_moe_experts(model, groups.expert_group)
    broadcast_parameters(model, groups)
    trained = wrap_data_parallel(model, groups, config.parallel.dense)
    optimizer = split_sharded_groups(build_optimizer(model, config.optim))
    start_step = 0
    same_layout = False
    if layout is not None:
        restore_sharded(run_dir, model, optimizer, groups)
        start_step = layout["step"]
        same_layout = (layout["world_size"], layout["expert_parallel"]) == (
            groups.world_size,
            groups.expert_parallel,
        )
        if groups.is_main:
            truncate_metrics(run_dir / "metrics.jsonl", start_step)
    elif groups.is_main:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    if same_layout:
        torch.set_rng_state(load_rng(run_dir, groups.rank))
    elif groups.rank > 0:
        torch.manual_seed(config.train.seed + _RANK_SEED_STRIDE * groups.rank)
    dist.barrier()

    steps, batch = config.train.steps, config.train.batch_size
    log = None
    if groups.is_main:
        log = MetricsLog(run_dir, config.train.log_every, steps, start_step, progress)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    state = TrainState(config, model, optimizer, step=start_step)
    last_eval: dict = {}
    saved_step = start_step if layout is not None else -1
    began = time.perf_counter()
    # Metrics stay on the device between log steps; ranks exchange them once per log step.
    window = MetricsWindow(groups.device)
    while state.step < steps:
        window.begin_step()
        lr = learning_rate(state.step, steps, config.optim.lr, config.schedule)
        set_learning_rate(optimizer, lr)
        waited = time.perf_counter()
        x, y, _ = train_data.batch(state.step)
        waited = time.perf_counter() - waited
        metrics = distributed_train_step_device(trained, optimizer, x, y, config, groups)
        window.add(metrics, batch, waited)  # images of the global batch
        state.step += 1
        if is_log_step(state.step, config):
            reduce = partial(_over_ranks, groups=groups)
            state.metrics = {**window.read(reduce), "train/lr": lr}
        if log is not None:
            log.after_step(state)
        if state.step % config.train.eval_every == 0 and state.step < steps:
            last_eval = _evaluate(trained, splits.test, splits.name, state, log, groups)
        if state.step % config.train.checkpoint_every == 0:
            save_sharded(run_dir, state.step, model, optimizer, config.to_dict(), groups)
            saved_step = state.step
    train_data.close()
    last_eval = _evaluate(trained, splits.test, splits.name, state, log, groups)
    if saved_step != state.step:
        save_sharded(run_dir, state.step, model, optimizer, config.to_dict(), groups)
    if log is not None:
        log.at_end(state)
    summary: dict = {"name": config.name, "run_dir": str(run_dir), "steps": state.step}
    num_params = count_parameters(model, groups)
    merged = wants_merged(config, num_params)
    if groups.is_main:
        checkpoint = (
            export_merged(run_dir, run_dir, config.train.keep_checkpoints)
            if merged
            else read_layout(run_dir)["path"]
        )
        final = {k.rsplit("/", 1)[-1]: v for k, v in last_eval.items()}
        summary.update(
            dataset=splits.name,
            test_accuracy=final.get("accuracy"),
            test_loss=final.get("loss"),
            compute_frac=final.get("compute_frac"),
            train_seconds_this_session=time.perf_counter() - began,
            resumed_from_step=start_step if resume is not None else None,
            init=str(init) if init is not None else None,
            init_notes=init_notes,
            world_size=groups.world_size,
            expert_parallel=groups.expert_parallel,
            notes=notes,
            dense=config.parallel.dense,
            num_params=num_params,
            checkpoint=str(checkpoint),
        )
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    dist.barrier()
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m visionmoe.distributed.train",
        description="Expert-parallel + data-parallel training (launch with torchrun).",
        epilog="example:\n  torchrun --nproc-per-node 2 -m visionmoe.distributed.train "
        "--recipe digits_vmoe --set train.steps=500",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--recipe", help="recipe name (default digits_vmoe, or with --init the config saved there)"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], nargs="+", metavar="KEY=VALUE"
    )
    parser.add_argument("--data", help="dataset path (shortcut for --set data.path=PATH)")
    parser.add_argument("--run-dir", help="where to write the run (default runs/<name>-<time>)")
    parser.add_argument("--resume", metavar="RUN", help="continue a distributed run")
    parser.add_argument(
        "--init",
        metavar="SOURCE",
        help="start from trained weights: a run, checkpoint, pretrained folder or vmoe prefix",
    )
    parser.add_argument(
        "--expert-parallel",
        type=int,
        metavar="N",
        help="ranks sharing one copy of the experts (default: the world size; must divide it "
        "and the expert count)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="seconds a collective may wait for a dead or stuck rank before every rank fails",
    )
    parser.add_argument("--backend", choices=("nccl", "gloo"), help="default: nccl if CUDA")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Parse, refuse impossible layouts before joining the group, train, leave the group."""
    from visionmoe.train.config import apply_set

    args = parse_args(argv)
    overrides = [item for group in args.overrides for item in group]
    if args.data:
        overrides.append(f"data.path={args.data}")
    config = None
    if args.resume:
        if overrides or args.init:
            raise ValueError("--resume continues a run as configured; drop --set/--data/--init")
        saved = json.loads((Path(args.resume) / "config.json").read_text())
        check_layout(
            ExperimentConfig.from_dict(saved),
            int(os.environ.get("WORLD_SIZE", "1")),
            args.expert_parallel,
        )
    else:
        config = apply_set(initial_config(args.recipe, args.init), overrides)
        check_layout(config, int(os.environ.get("WORLD_SIZE", "1")), args.expert_parallel)
    device = init_distributed(args.timeout, args.backend)
    groups = build_groups(args.expert_parallel, device)
    summary = train_distributed(
        config, groups, args.run_dir, args.resume, args.init, not args.no_progress
    )
    if groups.is_main:
        print(f"test accuracy: {summary['test_accuracy']:.4f}")
        print(f"run directory: {summary['run_dir']}")
    dist.destroy_process_group()
    return 0


def cli(argv: list[str] | None = None) -> None:
    """Run :func:`main` and exit with its status; on any failure exit non-zero at once.

    A rank whose peer died can hang in interpreter teardown (process-group destructors waiting
    on the dead peer), so failures skip teardown with ``os._exit``.
    """
    try:
        code = main(argv)
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
    except BaseException:  # every failure, including KeyboardInterrupt, must end the process
        traceback.print_exc()
        rank = os.environ.get("RANK", "?")
        print(f"rank {rank}: distributed training failed; exiting", file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        os._exit(code)
    sys.exit(0)


if __name__ == "__main__":
    cli()
