"""The papers' claims at small scale, on Fashion-MNIST (run manually; results are committed).

Command (about 20 minutes of one CPU core per seed at 600 steps; seeds can run as parallel
jobs, then be combined)::

    python -m benchmarks.quality.run --data ../shared/data/fashion_mnist.npz --seeds 0 1 2
    # or: one job per seed (--seeds 0, --seeds 1, ...), then --seeds 0 1 2 --merge-only

Experiments (all models: 28x28 inputs, patch 4 -> 49 patches, width 64, 4 blocks, GAP head,
the same optimizer, schedule, batch and steps):

(a) V-MoE (E=8, K=2, MoE in blocks 1 and 3) vs its dense twin at equal active FLOPs per token.
(b) Accuracy vs inference capacity factor, vanilla routing and BPR, on the (a) V-MoE models.
(c) Soft MoE vs token choice vs expert choice at equal expert compute (one image per group:
    K=1, cf=1 / cf=1 / 48 slots for 49 tokens).
(d) Sparse upcycling vs continued dense training at equal extra steps (top-1 experts, so the
    extra compute per step is equal).
(e) E^3 (E=8, M=2 members, K=1, MoE in blocks 1 and 3) vs a 2-model deep ensemble of dense ViTs
    (pairs of the (a) dense models): accuracy, NLL, ECE, inference FLOPs per image.
(f) PatchMerger (8 tokens after block 1) vs the dense ViT: accuracy change and inference speed-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from visionmoe.eval.classify import evaluate
from visionmoe.models.config import MoEConfig, ViTConfig, dense_twin
from visionmoe.models.ensemble import ensemble_log_probs, expected_calibration_error
from visionmoe.models.routing_control import set_routing
from visionmoe.train.config import (
    DataConfig,
    ExperimentConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
)
from visionmoe.train.inputs import load_splits, to_tensors
from visionmoe.train.run import load_run, run_training
from visionmoe.upcycle import upcycle_cli

BASE = ViTConfig(
    image_size=28,
    patch_size=4,
    in_chans=1,
    num_classes=10,
    hidden_size=64,
    mlp_dim=128,
    num_heads=4,
    num_layers=4,
    classifier="gap",
)
MOE_LAYERS = (1, 3)
CAPACITY_FACTORS = (0.125, 0.25, 0.5, 0.75, 1.0, 1.25, 2.0)


def experiment(name: str, model: ViTConfig, data: str, seed: int, steps: int) -> ExperimentConfig:
    return ExperimentConfig(
        name=name,
        model=model,
        data=DataConfig(kind="npz", path=data, crop_padding=2, hflip=True),
        optim=OptimConfig(lr=2e-3, weight_decay=0.05),
        schedule=ScheduleConfig(warmup_steps=min(200, steps // 10)),
        train=TrainConfig(
            steps=steps,
            batch_size=128,
            seed=seed,
            eval_every=steps,
            checkpoint_every=steps,
            log_every=max(1, steps // 20),
            eval_batch_size=500,
            label_smoothing=0.1,
        ),
    )


def models() -> dict[str, ViTConfig]:
    vmoe = replace(
        BASE,
        moe=MoEConfig(
            num_experts=8, top_k=2, capacity_factor=1.05, eval_capacity_factor=4.0, group_images=8
        ),
        moe_layers=MOE_LAYERS,
    )
    per_image = dict(group_images=1, capacity_factor=1.0, eval_capacity_factor=1.0)
    return {
        "dense": dense_twin(vmoe),
        "vmoe": vmoe,
        "token_choice": replace(vmoe, moe=MoEConfig(num_experts=8, top_k=1, **per_image)),
        "expert_choice": replace(
            vmoe,
            moe=MoEConfig(
                router="expert_choice",
                num_experts=8,
                capacity_rounding="round",
                capacity_multiple_of=None,
                importance_weight=0.0,
                load_weight=0.0,
                **per_image,
            ),
        ),
        "soft": replace(
            vmoe,
            moe=MoEConfig(
                router="soft",
                num_experts=8,
                slots_per_expert=6,
                noise_std=0.0,
                importance_weight=0.0,
                load_weight=0.0,
                group_images=1,
            ),
        ),
        "e3": replace(
            vmoe,
            moe=MoEConfig(
                num_experts=8,
                top_k=1,
                ensemble_members=2,
                capacity_factor=1.05,
                eval_capacity_factor=4.0,
            ),
        ),
        "merger": replace(dense_twin(vmoe), patch_merger_after=1, patch_merger_tokens=8),
    }


@torch.no_grad()
def flops_per_image(model: torch.nn.Module, x: torch.Tensor) -> float:
    with FlopCounterMode(display=False) as counter:
        model.eval()(x)
    return counter.get_total_flops() / len(x)


@torch.no_grad()
def images_per_second(model: torch.nn.Module, x: torch.Tensor, repeats: int = 5) -> float:
    model.eval()(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return len(x) / statistics.median(times)


def cached_or_train(config: ExperimentConfig, run_dir: Path, init: Path | None = None) -> dict:
    """Train, or reuse a finished run of the same config (lets seeds run as separate jobs)."""
    summary_file, config_file = run_dir / "summary.json", run_dir / "config.json"
    if summary_file.is_file() and config_file.is_file():
        if json.loads(config_file.read_text()) == json.loads(config.to_json()):
            return json.loads(summary_file.read_text())
    return run_training(config, run_dir=run_dir, init=init, progress=False)


def run_seed(data: str, seed: int, steps: int, out: Path, test) -> dict:
    cfgs = models()
    result: dict = {}
    runs: dict[str, Path] = {}
    for name in ("dense", "vmoe", "token_choice", "expert_choice", "soft", "e3", "merger"):
        run_dir = out / f"seed{seed}" / name
        summary = cached_or_train(experiment(name, cfgs[name], data, seed, steps), run_dir)
        runs[name] = run_dir
        model, _ = load_run(run_dir)
        metrics = evaluate(model, test.x, test.y, 500)
        result[name] = {
            "accuracy": metrics["accuracy"],
            "nll": metrics["loss"],
            "ece": metrics.get("ece"),
            "train_seconds": summary["train_seconds_this_session"],
            "flops_per_image": flops_per_image(model, test.x[:64]),
            "images_per_s": images_per_second(model, test.x[:500]),
        }
    # (b) capacity sweep on the V-MoE model.
    model, _ = load_run(runs["vmoe"])
    sweep = []
    for cf in CAPACITY_FACTORS:
        row = {"capacity_factor": cf}
        for label, bpr in (("vanilla", False), ("bpr", True)):
            set_routing(model, capacity_factor=cf, batch_priority=bpr)
            m = evaluate(model, test.x, test.y, 500)
            row[label] = m["accuracy"]
            row[f"{label}_compute"] = m["compute_frac"]
        sweep.append(row)
    result["sweep"] = sweep
    # (d) upcycling: a shorter dense run, then equal extra steps dense vs upcycled (top-1).
    base_steps, extra = steps // 2, steps // 2
    base_dir = out / f"seed{seed}" / "upcycle_base"
    run_training(
        experiment("upcycle_base", cfgs["dense"], data, seed, base_steps),
        run_dir=base_dir,
        progress=False,
    )
    cont = run_training(
        experiment("dense_continued", cfgs["dense"], data, seed, extra),
        run_dir=out / f"seed{seed}" / "dense_continued",
        init=base_dir,
        progress=False,
    )
    init = upcycle_cli(
        base_dir,
        out / f"seed{seed}" / "upcycled_init",
        [
            "num_experts=8",
            "top_k=1",
            "moe_layers=1,3",
            "capacity_factor=1.05",
            "eval_capacity_factor=4.0",
            f"train.steps={extra}",
        ],
    )
    up_cfg = ExperimentConfig.from_dict(json.loads((init / "config.json").read_text()))
    up = run_training(up_cfg, run_dir=out / f"seed{seed}" / "upcycled", init=init, progress=False)
    result["upcycling"] = {
        "base_steps": base_steps,
        "extra_steps": extra,
        "dense_continued": cont["test_accuracy"],
        "upcycled": up["test_accuracy"],
    }
    return result


def deep_ensemble(out: Path, seeds: list[int], test) -> list[dict]:
    """Pairs of dense models from different seeds, averaged in probability space."""
    rows = []
    for i, a in enumerate(seeds):
        b = seeds[(i + 1) % len(seeds)]
        if a == b:
            continue
        logits = []
        for s in (a, b):
            model, _ = load_run(out / f"seed{s}" / "dense")
            with torch.no_grad():
                logits.append(
                    torch.cat([model(test.x[j : j + 500]) for j in range(0, len(test.y), 500)])
                )
        log_probs = ensemble_log_probs(torch.stack(logits, dim=1))
        rows.append(
            {
                "pair": [a, b],
                "accuracy": float((log_probs.argmax(-1) == test.y).float().mean()),
                "nll": float(torch.nn.functional.nll_loss(log_probs, test.y)),
                "ece": expected_calibration_error(log_probs.exp(), test.y),
            }
        )
    return rows


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def markdown(report: dict) -> str:
    seeds = report["per_seed"]
    col = lambda name, key: [s[name][key] for s in seeds]  # noqa: E731
    lines = [
        f"Fashion-MNIST, {report['steps']} steps per model, seeds {report['seeds']} "
        "(mean ± std over seeds).",
        "",
        "| exp | model | test accuracy | NLL | GFLOPs/image | images/s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for exp, name in (
        ("a", "dense"),
        ("a", "vmoe"),
        ("c", "token_choice"),
        ("c", "expert_choice"),
        ("c", "soft"),
        ("e", "e3"),
        ("f", "merger"),
    ):
        lines.append(
            f"| ({exp}) | {name} | {mean_std(col(name, 'accuracy'))} | "
            f"{mean_std(col(name, 'nll'))} | "
            f"{statistics.mean(col(name, 'flops_per_image')) / 1e9:.4f} | "
            f"{statistics.mean(col(name, 'images_per_s')):.0f} |"
        )
    de = report["deep_ensemble"]
    if de:
        lines.append(
            f"| (e) | deep ensemble of 2 dense | {mean_std([r['accuracy'] for r in de])}"
            f" | {mean_std([r['nll'] for r in de])} | "
            f"{2 * statistics.mean(col('dense', 'flops_per_image')) / 1e9:.4f} | |"
        )
    lines += [
        "",
        "(b) accuracy vs inference capacity factor (V-MoE models, mean over seeds):",
        "",
        "| capacity factor | vanilla | BPR | compute (BPR) |",
        "|---:|---:|---:|---:|",
    ]
    for i, cf in enumerate(CAPACITY_FACTORS):
        v = [s["sweep"][i]["vanilla"] for s in seeds]
        b = [s["sweep"][i]["bpr"] for s in seeds]
        c = [s["sweep"][i]["bpr_compute"] for s in seeds]
        lines.append(f"| {cf:g} | {mean_std(v)} | {mean_std(b)} | {statistics.mean(c):.3f} |")
    up = [s["upcycling"] for s in seeds]
    lines += [
        "",
        f"(d) upcycling after {up[0]['base_steps']} dense steps, "
        f"+{up[0]['extra_steps']} steps each:",
        "",
        "| continuation | test accuracy |",
        "|---|---:|",
        f"| dense | {mean_std([u['dense_continued'] for u in up])} |",
        f"| upcycled (E=8, top-1) | {mean_std([u['upcycled'] for u in up])} |",
    ]
    e3 = [s["e3"] for s in seeds]
    lines += [
        "",
        "(e) E^3 ECE "
        + mean_std([r["ece"] for r in e3])
        + "; deep ensemble ECE "
        + (mean_std([r["ece"] for r in de]) if de else "n/a")
        + ".",
    ]
    speed = statistics.mean(col("merger", "images_per_s")) / statistics.mean(
        col("dense", "images_per_s")
    )
    delta = statistics.mean(col("merger", "accuracy")) - statistics.mean(col("dense", "accuracy"))
    lines += [
        f"(f) PatchMerger: {speed:.2f}x inference images/s, accuracy change "
        f"{delta:+.4f} vs the dense ViT."
    ]
    return "\n".join(lines) + "\n"


def plots(report: dict, out: Path) -> list[Path]:
    """The capacity sweep (b) and test accuracy per model (a, c, e, f) as PNGs."""
    from visionmoe.eval.plots import plot_capacity_sweep

    seeds = report["per_seed"]
    mean = lambda key, i: statistics.mean(s["sweep"][i][key] for s in seeds)  # noqa: E731
    idx = range(len(CAPACITY_FACTORS))
    sweep = plot_capacity_sweep(
        list(CAPACITY_FACTORS),
        [mean("vanilla", i) for i in idx],
        [mean("bpr", i) for i in idx],
        out / "capacity_sweep.png",
        compute=[mean("bpr_compute", i) for i in idx],
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["dense", "vmoe", "token_choice", "expert_choice", "soft", "e3", "merger"]
    accs = [[s[n]["accuracy"] for s in seeds] for n in names]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(
        names,
        [statistics.mean(a) for a in accs],
        yerr=[statistics.stdev(a) if len(a) > 1 else 0 for a in accs],
        capsize=4,
    )
    low = min(min(a) for a in accs)
    ax.set_ylim(low - 0.02, max(max(a) for a in accs) + 0.01)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Fashion-MNIST, {report['steps']} steps, seeds {report['seeds']}")
    fig.tight_layout()
    bars = out / "accuracy.png"
    fig.savefig(bars, dpi=120)
    plt.close(fig)
    return [Path(sweep), bars]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Small-scale reproduction of the papers' claims")
    parser.add_argument("--data", required=True, help="fashion_mnist.npz (x_train, y_train, ...)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument("--results", type=Path, default=Path("benchmarks/quality/results"))
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument(
        "--merge-only",
        action="store_true",
        help="only combine the per-seed results already written (seeds run as separate jobs)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = DataConfig(kind="npz", path=args.data)
    test = to_tensors(load_splits(data).test, BASE)
    began = time.perf_counter()
    args.results.mkdir(parents=True, exist_ok=True)
    per_seed = []
    for seed in args.seeds:
        path = args.results / f"seed{seed}.json"
        if not args.merge_only:
            path.write_text(json.dumps(run_seed(args.data, seed, args.steps, args.out, test)))
        per_seed.append(json.loads(path.read_text()))
    report = {
        "command": "python -m benchmarks.quality.run --data DATA --seeds "
        + " ".join(map(str, args.seeds))
        + f" --steps {args.steps} --threads {args.threads}",
        "seeds": args.seeds,
        "steps": args.steps,
        "per_seed": per_seed,
        "deep_ensemble": deep_ensemble(args.out, args.seeds, test),
        "seconds": time.perf_counter() - began,
        "torch": torch.__version__,
    }
    (args.results / "quality.json").write_text(json.dumps(report, indent=2))
    (args.results / "quality.md").write_text(markdown(report))
    plots(report, args.results)
    print(markdown(report))


if __name__ == "__main__":
    main()
