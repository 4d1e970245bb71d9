"""Accuracy versus inference capacity, vanilla routing and BPR side by side (V-MoE Fig. 5)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from visionmoe.eval.classify import evaluate_batches
from visionmoe.eval.inputs import EvalOptions, default_out_dir, describe, open_for_eval
from visionmoe.models.routing_control import set_routing

DEFAULT_CAPACITY_FACTORS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 2.0, 4.0)


def sweep_run(
    run: str,
    capacity_factors: tuple[float, ...] = DEFAULT_CAPACITY_FACTORS,
    out_dir: str | None = None,
    batch_size: int | None = None,
    orders: int = 1,
    *,
    options: EvalOptions | None = None,
) -> dict:
    """Evaluate a model (any source ``load_model`` opens) at each capacity factor, with and
    without BPR (``options``: data, batch size and image size as for ``evaluate_run``).

    Which tokens compete for an expert depends on how the test set is cut into routing groups,
    so vanilla routing (position order) in particular varies with the order of the test
    examples; ``orders > 1`` averages ``orders`` seeded orders (the evaluation order of seeds
    ``seed .. seed + orders - 1``, ``seed`` being the run's).
    Writes ``sweep.json``, ``sweep.md`` and ``sweep.png`` to ``out_dir`` (default
    ``RUN/sweep``, or ``PREFIX_sweep`` beside a vmoe checkpoint) and returns the results.
    ``compute_frac`` is the fraction of token-expert assignments processed.
    """
    if not capacity_factors or any(not cf > 0 for cf in capacity_factors):
        raise ValueError(f"capacity factors must be > 0, got {list(capacity_factors)}")
    if orders < 1:
        raise ValueError(f"orders must be >= 1, got {orders}")
    options = options or EvalOptions()
    if batch_size is not None:
        options = replace(options, batch_size=batch_size)
    inputs = open_for_eval(run, options)
    model = inputs.model
    if not any(
        hasattr(m.router, "bpr_score") for _, m in model.moe_blocks.items() if hasattr(m, "router")
    ):
        raise ValueError(f"model '{run}' has no token-choice MoE layers; nothing to sweep")
    seeds = [inputs.seed + r for r in range(orders)]
    rows = []
    for cf in sorted(capacity_factors):
        row = {"capacity_factor": cf}
        for label, bpr in (("vanilla", False), ("bpr", True)):
            set_routing(model, capacity_factor=cf, batch_priority=bpr)
            results = [
                evaluate_batches(model, inputs.batches(seed=seed), options.precision)
                for seed in seeds
            ]
            row[f"{label}_accuracy"] = float(np.mean([r["accuracy"] for r in results]))
            row[f"{label}_compute_frac"] = float(np.mean([r["compute_frac"] for r in results]))
        rows.append(row)
    out = Path(out_dir) if out_dir else default_out_dir(run, "sweep")
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "run": str(run),
        **describe(inputs.info),
        "dataset": inputs.splits.name,
        "orders": orders,
        "num_examples": results[0]["num_examples"],
        "rows": rows,
    }
    (out / "sweep.json").write_text(json.dumps(result, indent=2))
    (out / "sweep.md").write_text(sweep_table(rows))
    from visionmoe.eval.plots import plot_capacity_sweep

    plot_capacity_sweep(
        [r["capacity_factor"] for r in rows],
        [r["vanilla_accuracy"] for r in rows],
        [r["bpr_accuracy"] for r in rows],
        out / "sweep.png",
        compute=[r["bpr_compute_frac"] for r in rows],
    )
    result["files"] = [str(out / n) for n in ("sweep.json", "sweep.md", "sweep.png")]
    return result


def sweep_table(rows: list[dict]) -> str:
    lines = [
        "| capacity factor | vanilla acc | BPR acc | compute (vanilla) | compute (BPR) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['capacity_factor']:g} | {r['vanilla_accuracy']:.4f} | {r['bpr_accuracy']:.4f} "
            f"| {r['vanilla_compute_frac']:.3f} | {r['bpr_compute_frac']:.3f} |"
        )
    return "\n".join(lines) + "\n"
