"""BPR vs vanilla routing on the default digits recipe and close variants (run manually).

Question: on which capacity factors does Batch Priority Routing beat vanilla routing for the
default ``digits_vmoe`` run, and does any reasonable change of that recipe make BPR at least as
good as vanilla at *every* capacity factor below 1?

For each variant and seed this trains ``digits_vmoe`` with the variant's overrides (or reuses a
finished run and its measurements under ``--run-root``), sweeps the inference capacity factor
with and without BPR, averaging ``--orders`` test-set orders (routing groups depend on the
order), and measures how much the model relies on second choices (accuracy with K=1 at
inference minus K=2, nothing dropped).
Writes ``bpr_digits.json`` and ``bpr_digits.md`` (BPR minus vanilla, in accuracy points).

Command (about 90 s of 2 CPU cores per run; 18 runs by default)::

    python -m benchmarks.quality.bpr_digits --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from visionmoe.eval.classify import evaluate
from visionmoe.eval.sweep import sweep_run
from visionmoe.models.routing_control import set_routing
from visionmoe.recipes import get_recipe
from visionmoe.train.config import apply_set
from visionmoe.train.inputs import load_splits, to_tensors
from visionmoe.train.run import load_run, run_training

TOKEN = "model.classifier=token"
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "default": ("digits_vmoe as shipped (GAP head)", []),
    "bpr_train": ("BPR also during training", ["model.moe.batch_priority=true"]),
    "token_head": ("class-token head", [TOKEN]),
    "token_bpr_train": (
        "class-token head, BPR during training",
        [TOKEN, "model.moe.batch_priority=true"],
    ),
    "token_wide_experts": ("class-token head, experts twice as wide", [TOKEN, "model.mlp_dim=256"]),
    "token_six_blocks": (
        "class-token head, 6 blocks, MoE in 1, 3, 5",
        [TOKEN, "model.num_layers=6", "model.moe_layers=[1,3,5]"],
    ),
}
CAPACITY_FACTORS = (0.1, 0.25, 0.5, 0.75, 1.0, 4.0)


def second_choice_reliance(run: Path) -> float:
    """Accuracy points lost when every token keeps only its first choice (nothing dropped)."""
    model, config = load_run(run)
    test = to_tensors(load_splits(config.data).test, config.model)
    set_routing(model, capacity_factor=4.0, batch_priority=False)
    both = evaluate(model, test.x, test.y)["accuracy"]
    set_routing(model, top_k=1)
    first = evaluate(model, test.x, test.y)["accuracy"]
    return 100.0 * (first - both)


def _gaps(sweep: dict) -> dict[str, float]:
    """BPR minus vanilla accuracy, in points, keyed by capacity factor."""
    return {
        str(r["capacity_factor"]): 100.0 * (r["bpr_accuracy"] - r["vanilla_accuracy"])
        for r in sweep["rows"]
    }


def run_one(variant: str, seed: int, root: Path, orders: int) -> dict:
    run = root / f"{variant}-s{seed}"
    if not (run / "summary.json").exists():
        config = apply_set(get_recipe("digits_vmoe"), [*VARIANTS[variant][1], f"train.seed={seed}"])
        run_training(config, run_dir=run, progress=False)
    cached = run / "bpr_study.json"
    if cached.exists() and json.loads(cached.read_text()).get("orders") == orders:
        return json.loads(cached.read_text())["result"]
    summary = json.loads((run / "summary.json").read_text())
    sweep = sweep_run(str(run), CAPACITY_FACTORS, out_dir=str(run / "sweep"), orders=orders)
    # What `visionmoe sweep RUN` prints: the test set in dataset order only.
    single = sweep_run(str(run), CAPACITY_FACTORS, out_dir=str(run / "sweep_one_order"))
    result = {
        "variant": variant,
        "seed": seed,
        "test_accuracy": summary["test_accuracy"],
        "second_choice_points": second_choice_reliance(run),
        "bpr_minus_vanilla_points": _gaps(sweep),
        "dataset_order_bpr_minus_vanilla_points": _gaps(single),
    }
    cached.write_text(json.dumps({"orders": orders, "result": result}))
    return result


def _section(results: list[dict], key: str, title: str) -> list[str]:
    cfs = [str(cf) for cf in CAPACITY_FACTORS if cf < 1]
    lines = [
        title,
        "",
        "| variant | seeds | test acc | K=1 | "
        + " | ".join(f"cf {c}" for c in cfs)
        + " | all >= 0 |",
        "|---|---|---:|---:|" + "---:|" * len(cfs) + "---:|",
    ]
    for variant, (label, _) in VARIANTS.items():
        rows = sorted((r for r in results if r["variant"] == variant), key=lambda r: r["seed"])
        if not rows:
            continue
        acc = statistics.mean(r["test_accuracy"] for r in rows)
        k1 = statistics.mean(r["second_choice_points"] for r in rows)
        cells = [" / ".join(f"{r[key][c]:+.2f}" for r in rows) for c in cfs]
        # Equal accuracies can differ by float rounding in the subtraction.
        ok = sum(all(r[key][c] >= -1e-9 for c in cfs) for r in rows)
        lines.append(
            f"| {label} | {', '.join(str(r['seed']) for r in rows)} | {acc:.4f} | {k1:+.2f} | "
            + " | ".join(cells)
            + f" | {ok}/{len(rows)} |"
        )
    return lines


def table(results: list[dict], orders: int) -> str:
    head = (
        "BPR minus vanilla test accuracy in points (one test image = 0.22), one value per seed "
        "(in the order of the 'seeds' column), at each capacity factor < 1. 'test acc' is the mean "
        "test accuracy, 'K=1' the mean change when every token keeps only its first choice "
        "(nothing dropped). 'all >= 0' counts the seeds where BPR is at or above vanilla at "
        "every capacity factor < 1."
    )
    lines = [head, ""]
    lines += _section(results, "bpr_minus_vanilla_points", f"Mean over {orders} test-set orders:")
    lines += [""]
    lines += _section(
        results,
        "dataset_order_bpr_minus_vanilla_points",
        "Dataset order only (what `visionmoe sweep RUN` prints):",
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--orders", type=int, default=5)
    parser.add_argument("--run-root", default="runs/bpr_digits")
    parser.add_argument("--out", default="benchmarks/quality/results")
    args = parser.parse_args(argv)
    root, out = Path(args.run_root), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for variant in args.variants:
        for seed in args.seeds:
            results.append(run_one(variant, seed, root, args.orders))
            print(json.dumps(results[-1]), flush=True)
    # Runs of other seeds measured earlier under the same root are reported too.
    done = {(r["variant"], r["seed"]) for r in results}
    for cached in sorted(root.glob("*/bpr_study.json")):
        record = json.loads(cached.read_text())
        result = record["result"]
        key = (result["variant"], result["seed"])
        if record["orders"] == args.orders and key not in done and key[0] in args.variants:
            results.append(result)
    (out / "bpr_digits.json").write_text(
        json.dumps({"orders": args.orders, "runs": results}, indent=2)
    )
    (out / "bpr_digits.md").write_text(table(results, args.orders))
    print(table(results, args.orders))


if __name__ == "__main__":
    main()
