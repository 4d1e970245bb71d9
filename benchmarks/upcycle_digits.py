"""Sparse upcycling on the bundled digits: continue a trained dense ViT dense vs upcycled.

Protocol (spec section 6.2, at toy scale): train the ``digits_vit`` recipe for ``--dense-steps``
(the "sunk" dense cost), then spend the same ``--extra-steps`` on the same data, same schedule
(fresh warmup + cosine) and same seed either continuing the dense model or training MoE models
upcycled from it (every other block's MLP copied into E=8 experts, fresh router). Reports test
accuracy at the upcycling point and after the extra steps as JSON and a markdown table.

Run manually (about 70 seconds on 2 idle CPU cores; not part of the test suite)::

    python -m benchmarks.upcycle_digits --out runs/upcycle_digits
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from visionmoe.eval.classify import evaluate
from visionmoe.recipes import get_recipe
from visionmoe.train.config import ExperimentConfig, apply_set
from visionmoe.train.inputs import load_splits, to_tensors
from visionmoe.train.run import load_run, run_training
from visionmoe.upcycle import upcycle_cli

# name -> upcycle_cli options (E=8 experts in blocks 1 and 3, as the digits_vmoe recipe).
VARIANTS: dict[str, list[str]] = {
    "upcycled top-2, normalized combine": [
        "num_experts=8",
        "router=top_k",
        "normalize_combine=true",
        "capacity_factor=1.05",
        "eval_capacity_factor=4.0",
        "seed=0",
    ],
    "upcycled top-2, raw gates (V-MoE)": [
        "num_experts=8",
        "router=top_k",
        "capacity_factor=1.05",
        "eval_capacity_factor=4.0",
        "seed=0",
    ],
    "upcycled expert choice, cf 2": ["num_experts=8", "router=expert_choice", "seed=0"],
}


def _schedule_sets(steps: int, threads: int) -> list[str]:
    return [
        f"train.steps={steps}",
        f"train.threads={threads}",
        f"train.eval_every={steps}",
        f"train.checkpoint_every={steps}",
        f"train.log_every={max(1, steps // 10)}",
    ]


def _test_accuracy(run_dir: Path, test) -> float:
    model, _ = load_run(run_dir)
    return float(evaluate(model, test.x, test.y)["accuracy"])


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").replace("__", "_")


def run(out: Path, dense_steps: int, extra_steps: int, threads: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    base = apply_set(get_recipe("digits_vit"), _schedule_sets(dense_steps, threads))
    began = time.perf_counter()
    dense = run_training(base, run_dir=out / "dense", progress=False)
    rows = [
        {
            "model": f"dense, {dense_steps} steps (upcycling point)",
            "steps": dense_steps,
            "test_accuracy": dense["test_accuracy"],
            "seconds": round(dense["train_seconds_this_session"], 1),
        }
    ]
    continued = apply_set(base, _schedule_sets(extra_steps, threads))
    result = run_training(
        continued, run_dir=out / "dense_continued", init=out / "dense", progress=False
    )
    rows.append(
        {
            "model": "dense, continued",
            "steps": dense_steps + extra_steps,
            "step0_accuracy": dense["test_accuracy"],
            "test_accuracy": result["test_accuracy"],
            "params": result["num_params"],
            "seconds": round(result["train_seconds_this_session"], 1),
        }
    )
    test = to_tensors(load_splits(base.data).test, base.model)
    for name, options in VARIANTS.items():
        slug = _slug(name)
        init = upcycle_cli(
            out / "dense", out / f"{slug}_init", options + _schedule_sets(extra_steps, threads)
        )
        config = ExperimentConfig.from_dict(json.loads((init / "config.json").read_text()))
        step0 = _test_accuracy(init, test)
        result = run_training(config, run_dir=out / slug, init=init, progress=False)
        rows.append(
            {
                "model": name,
                "steps": dense_steps + extra_steps,
                "step0_accuracy": step0,
                "test_accuracy": result["test_accuracy"],
                "params": result["num_params"],
                "compute_frac": result.get("compute_frac"),
                "seconds": round(result["train_seconds_this_session"], 1),
            }
        )
    report = {
        "recipe": "digits_vit",
        "dense_steps": dense_steps,
        "extra_steps": extra_steps,
        "threads": threads,
        "total_seconds": round(time.perf_counter() - began, 1),
        "rows": rows,
    }
    (out / "upcycle_digits.json").write_text(json.dumps(report, indent=2))
    (out / "upcycle_digits.md").write_text(markdown(report))
    return report


def markdown(report: dict) -> str:
    lines = [
        f"Sparse upcycling on digits: {report['dense_steps']} dense steps, then "
        f"{report['extra_steps']} extra steps each (same data, schedule and seed).",
        "",
        "| model | total steps | test acc. at upcycling | final test acc. | params | train s |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        step0 = row.get("step0_accuracy")
        lines.append(
            f"| {row['model']} | {row['steps']} | "
            f"{'' if step0 is None else f'{step0:.4f}'} | {row['test_accuracy']:.4f} | "
            f"{row.get('params', '')} | {row['seconds']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/upcycle_digits"))
    parser.add_argument("--dense-steps", type=int, default=600)
    parser.add_argument("--extra-steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    report = run(args.out, args.dense_steps, args.extra_steps, args.threads)
    print(markdown(report))
    print(f"written to {args.out}/upcycle_digits.{{json,md}} in {report['total_seconds']} s")


if __name__ == "__main__":
    main()
