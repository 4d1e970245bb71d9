"""GPU check: a reduced V-MoE-B/16 and its dense twin trained in bf16 on one CUDA device.

Run on a machine with a GPU (a few minutes)::

    python -m benchmarks.gpu_check                       # JSON to stdout and gpu_check.json
    python -m benchmarks.gpu_check --steps 300 --batch-size 128 --out /tmp/gpu_check.json
    python -m benchmarks.gpu_check --dry-run             # CPU, tiny model, a few steps (CI)

What it does, for the MoE model and then its dense twin (same network, each MoE block replaced by
a dense MLP of ``K * mlp_dim`` hidden units: equal active FLOPs per token):

1. trains with the library's own step (:func:`visionmoe.train.step.train_step_device`: bf16
   autocast, routers in float32, fused AdamW, gradient clipping, TF32, static dispatch) on a pool
   of synthetic batches that live on the device, reading the metrics back every ``--log-every``
   steps as the fit loop does;
2. checks that steps between log steps make no host syncs, twice: with
   ``torch.cuda.set_sync_debug_mode("error")`` (the driver-level check: any synchronising call
   raises) and with :class:`visionmoe.train.host_sync.HostSyncCounter` (the op-level count);
3. reports step time, images/s, peak allocated memory and the first / last logged loss, then
   the MoE / dense step-time ratio, as JSON.

The reduced V-MoE-B/16 keeps B/16's width, heads, MLP size, experts (E=8, K=2, Every-2) and
capacity, with ``--layers`` blocks (default 8) at ``--image-size`` pixels (default 128: 64
patches), so a few hundred steps take a couple of minutes. ``--dry-run`` swaps in the debug
V-MoE on CPU and checks syncs with the counter only; it is what the test suite runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import visionmoe
from visionmoe.models.config import dense_twin
from visionmoe.recipes import get_recipe
from visionmoe.runtime import configure_backends, peak_memory_mb, reset_peak_memory
from visionmoe.train.config import apply_set
from visionmoe.train.host_sync import HostSyncCounter
from visionmoe.train.metrics import MetricsWindow
from visionmoe.train.optim import build_optimizer
from visionmoe.train.step import train_step_device

BASE_MODEL = "vmoe_b16_e8_every2"
POOL = 4  # synthetic batches, cycled; labels are fixed per image, so the loss goes down


def model_configs(args: argparse.Namespace):
    """``(moe_config, dense_config)`` of the model under test."""
    if args.dry_run:
        moe = visionmoe.get_config("vmoe_debug", dispatch="static")
    else:
        layers = tuple(range(1, args.layers, 2))  # Every-2, as released
        moe = visionmoe.get_config(
            BASE_MODEL,
            num_layers=args.layers,
            moe_layers=layers,
            image_size=args.image_size,
            num_classes=1000,
            dispatch="static",
        )
    return moe, dense_twin(moe)


def train_config(args: argparse.Namespace):
    return apply_set(
        get_recipe("digits_vmoe"),
        [
            f"train.batch_size={args.batch_size}",
            f"train.precision={args.precision}",
            f"train.log_every={args.log_every}",
            "optim.lr=1e-4",
        ],
    )


def synthetic_pool(config, batch_size: int, device: torch.device):
    generator = torch.Generator(device=device).manual_seed(0)
    shape = (batch_size, config.in_chans, config.image_size, config.image_size)
    return [
        (
            torch.randn(shape, device=device, generator=generator),
            torch.randint(0, config.num_classes, (batch_size,), device=device, generator=generator),
        )
        for _ in range(POOL)
    ]


def run_one(name: str, model_config, args: argparse.Namespace, device: torch.device) -> dict:
    """Train one model; returns its timings, memory, losses and host-sync findings."""
    torch.manual_seed(0)
    config = train_config(args)
    model = visionmoe.VisionTransformer(model_config).to(device)
    optimizer = build_optimizer(model, config.optim)
    pool = synthetic_pool(model_config, args.batch_size, device)
    window = MetricsWindow(device)

    def step(i: int) -> None:
        x, y = pool[i % POOL]
        window.begin_step()
        window.add(train_step_device(model, optimizer, x, y, config), len(x), 0.0)

    for i in range(args.warmup):
        step(i)
    window.read()
    # Host syncs in steps that are not log steps: the counter on any device, and the driver's
    # own check on CUDA (raises on the first synchronising call).
    with HostSyncCounter() as counter:
        for i in range(args.sync_steps):
            step(i)
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            for i in range(args.sync_steps):
                step(i)
            driver_check = "no sync"
        except RuntimeError as err:
            driver_check = f"synced: {err}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
    else:
        driver_check = "not run (CPU)"
    window.read()

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    reset_peak_memory(device)
    losses, step_seconds = [], []
    began = last = time.perf_counter()
    for i in range(args.steps):
        step(i)
        if (i + 1) % args.log_every == 0 or i + 1 == args.steps:
            logged = window.read()  # waits for the device, as a log step does
            now = time.perf_counter()
            losses.append(round(logged["train/loss"], 4))
            step_seconds.append((now - last) / window_len(i, args))
            last = now
    total = time.perf_counter() - began
    return {
        "model": name,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "steps": args.steps,
        "step_ms_median": round(1e3 * statistics.median(step_seconds), 3),
        "images_per_s": round(args.steps * args.batch_size / total, 1),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "loss_first_last": [losses[0], losses[-1]],
        "host_syncs_between_log_steps": dict(counter.counts),
        "cuda_sync_debug_mode": driver_check,
    }


def window_len(i: int, args: argparse.Namespace) -> int:
    """Steps in the log window that ends at step index ``i``."""
    return (i % args.log_every) + 1


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, debug model, few steps")
    parser.add_argument("--steps", type=int, help="timed steps (default 300; dry run 6)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 20; dry run 1)")
    parser.add_argument("--sync-steps", type=int, default=3, help="steps checked for host syncs")
    parser.add_argument("--batch-size", type=int, help="default 128; dry run 4")
    parser.add_argument("--layers", type=int, default=8, help="blocks of the reduced B/16")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--out", default="gpu_check.json", help="JSON file to write")
    args = parser.parse_args(argv)
    dry = args.dry_run
    args.steps = args.steps or (6 if dry else 300)
    args.warmup = args.warmup if args.warmup is not None else (1 if dry else 20)
    args.batch_size = args.batch_size or (4 if dry else 128)
    if dry:
        args.log_every = min(args.log_every, 3)
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_check: error: no CUDA device here; use --dry-run on CPU")
    else:
        device = torch.device("cuda")
    configure_backends(device)
    moe_config, dense_config = model_configs(args)
    moe = run_one("moe", moe_config, args, device)
    dense = run_one("dense", dense_config, args, device)
    report = {
        "mode": "dry-run (CPU)" if dry else "cuda",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": "vmoe_debug" if dry else f"{BASE_MODEL} reduced",
        "model_config": {
            "layers": moe_config.num_layers,
            "moe_layers": list(moe_config.moe_layers),
            "image_size": moe_config.image_size,
            "hidden_size": moe_config.hidden_size,
            "experts": moe_config.moe.num_experts,
            "top_k": moe_config.moe.top_k,
        },
        "batch_size": args.batch_size,
        "precision": args.precision,
        "results": [moe, dense],
        "moe_over_dense_step_time": round(moe["step_ms_median"] / dense["step_ms_median"], 3),
        "no_host_syncs": all(
            not r["host_syncs_between_log_steps"]
            and not r["cuda_sync_debug_mode"].startswith("synced")
            for r in (moe, dense)
        ),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if not report["no_host_syncs"]:
        print("gpu_check: host syncs found between log steps (see above)", file=sys.stderr)
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["no_host_syncs"] else 1)
