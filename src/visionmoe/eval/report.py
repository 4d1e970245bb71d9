"""One-call routing inspection: figures, a JSON summary and a self-contained HTML report.

:func:`inspect_model` routes (at most ``max_images``) images of a dataset through a model, then
again at each reduced eval capacity factor with vanilla routing and with Batch Priority Routing,
and writes into ``out_dir``:

- ``expert_load.png``: fraction of kept assignments per expert, per sparse layer;
- ``class_expert_layer<i>.png``: class x expert specialisation heatmap, per sparse layer;
- ``patch_experts_layer<i>.png``: example patches coloured by expert (first and last layer);
- ``dropped_tokens_layer<i>.png``: dropped patches per capacity factor (first and last layer);
- ``capacity_sweep.png``: accuracy vs capacity factor / expert compute;
- ``routing_stats.json``: per-layer metrics, loads, class/expert matrices and the sweep;
- ``report.html``: all of it in one file with images inlined as base64 data URIs, inline CSS and
  no scripts or external links, so it can be mailed or archived and opened offline.

Image-text (LIMoE) models get :func:`visionmoe.eval.limoe_report.inspect_limoe_model` instead.

Models without any MoE layer raise ``ValueError``. Soft MoE models have no discrete routing to
draw, so they still get a report, with the metrics table only: failing on them would make a
sweep over model families stop half way for no useful reason.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from visionmoe.data.core import ImageDataset
from visionmoe.eval.plots import (
    plot_capacity_sweep,
    plot_class_expert_heatmap,
    plot_dropped_maps,
    plot_expert_load,
    plot_patch_experts,
)
from visionmoe.eval.routing_stats import (
    NO_MOE_MESSAGE,
    RoutingStats,
    collect_routing,
    moe_layers,
)

__all__ = ["example_indices", "inspect_model", "render_html"]

# Table columns shown first when present; any other scalar metric follows alphabetically.
METRIC_ORDER = (
    "load_cv2",
    "importance_cv2",
    "dropped_frac",
    "assignments_dropped_frac",
    "router_entropy",
    "marginal_entropy",
    "top1_gate",
    "capacity_used",
    "compute_frac",
    "experts_per_token_min",
    "experts_per_token_max",
)

CSS = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; margin-top: 0.3em; }
.note { font-size: 0.85em; color: #555; }
"""


def example_indices(labels: np.ndarray, num: int) -> np.ndarray:
    """Indices of ``num`` images taken round-robin over classes (in order of first appearance).

    The first ``num`` images of a dataset are often all one class; spreading the examples over
    classes shows whether different content goes to different experts.
    """
    labels = np.asarray(labels)
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels.tolist()):
        by_class.setdefault(int(label), []).append(i)
    queues = list(by_class.values())
    picked: list[int] = []
    depth = 0
    while len(picked) < min(num, labels.size):
        for queue in queues:
            if depth < len(queue) and len(picked) < num:
                picked.append(queue[depth])
        depth += 1
    return np.asarray(picked, dtype=np.int64)


def _finite(value: Any) -> Any:
    """JSON-safe copy: numpy to Python, NaN/inf to None (``json`` would write invalid NaN)."""
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, np.ndarray):
        return _finite(value.tolist())
    if isinstance(value, (np.integer, bool, np.bool_)):
        return value.item() if isinstance(value, np.generic) else value
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "&ndash;"
    return f"{value:.4g}"


def _metrics_table(metrics: dict[int, dict[str, float]], kinds: dict[int, str]) -> str:
    names = {n for m in metrics.values() for n in m}
    columns = [n for n in METRIC_ORDER if n in names] + sorted(names - set(METRIC_ORDER))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["block", "layer", *columns])
    rows = []
    for index in sorted(metrics):
        cells = "".join(f"<td>{_fmt(metrics[index].get(c))}</td>" for c in columns)
        rows.append(f"<tr><td>{index}</td><td>{html.escape(kinds[index])}</td>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _sweep_table(sweep: list[dict[str, Any]]) -> str:
    head = "<tr><th>capacity factor</th><th>acc. vanilla</th><th>acc. BPR</th>"
    head += "<th>expert compute</th><th>dropped (BPR or vanilla)</th></tr>"
    rows = []
    for row in sweep:
        rows.append(
            f"<tr><td>{row['capacity_factor']:g}</td><td>{_fmt(row['accuracy_vanilla'])}</td>"
            f"<td>{_fmt(row['accuracy_bpr'])}</td><td>{_fmt(row['compute'])}</td>"
            f"<td>{_fmt(row['dropped_frac'])}</td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def render_html(
    title: str,
    summary: Sequence[tuple[str, str]],
    metrics_html: str,
    figures: Sequence[tuple[Path, str]],
    notes: Sequence[str] = (),
    sweep_html: str = "",
) -> str:
    """Assemble the report; each figure's PNG is read and inlined as a base64 data URI."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<table>",
        *(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary),
        "</table>",
        "<h2>Per-layer router metrics</h2>",
        '<p class="note">Scalar metrics from each batch\'s forward pass, averaged over batches '
        "weighted by batch size (tokens_processed is summed, experts_per_token_min/max are the "
        "extremes over batches).</p>",
        metrics_html,
    ]
    if sweep_html:
        parts += ["<h2>Capacity sweep</h2>", sweep_html]
    parts += [f'<p class="note">{html.escape(n)}</p>' for n in notes]
    if figures:
        parts.append("<h2>Figures</h2>")
    for path, caption in figures:
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        parts.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def _describe(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    moe = getattr(config, "moe", None)
    if moe is None:
        return "dense"
    text = f"{moe.router}, E={moe.num_experts}"
    if moe.router == "top_k":
        text += f", K={moe.top_k}"
    return text + f", MoE blocks {tuple(config.moe_layers)}"


def _run_sweep(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    common: dict[str, Any],
    capacity_factors: Sequence[float],
    use_bpr: bool,
) -> tuple[list[dict[str, Any]], dict[float, RoutingStats], list[str]]:
    """Accuracy/compute per capacity factor; returns rows, the stats for drop maps, and notes."""
    rows: list[dict[str, Any]] = []
    shown: dict[float, RoutingStats] = {}
    notes: list[str] = []
    for cf in sorted(float(c) for c in capacity_factors):
        try:
            vanilla = collect_routing(
                model, images, labels, capacity_factor=cf, batch_priority=False, **common
            )
            bpr = (
                collect_routing(
                    model, images, labels, capacity_factor=cf, batch_priority=True, **common
                )
                if use_bpr
                else None
            )
        except ValueError as err:  # e.g. a capacity below one slot for expert choice
            notes.append(f"Capacity factor {cf:g} skipped: {err}")
            continue
        chosen = bpr if bpr is not None else vanilla
        shown[cf] = chosen
        compute = [m["compute_frac"] for m in vanilla.metrics.values() if "compute_frac" in m]
        dropped = [chosen.layers[i].dropped_frac for i in chosen.sparse_layers]
        rows.append(
            {
                "capacity_factor": cf,
                "accuracy_vanilla": vanilla.accuracy,
                "accuracy_bpr": None if bpr is None else bpr.accuracy,
                "compute": float(np.mean(compute)) if compute else None,
                "dropped_frac": float(np.mean(dropped)) if dropped else None,
            }
        )
    return rows, shown, notes


def inspect_model(
    model: nn.Module,
    dataset: ImageDataset,
    image_size: int,
    channels: int,
    out_dir: str | Path,
    num_examples: int = 8,
    capacity_factors: Sequence[float] = (0.25, 0.5, 1.0),
    batch_priority: bool = True,
    max_images: int = 2000,
    *,
    batch_size: int = 256,
    title: str = "MoE routing report",
    progress: bool = True,
) -> Path:
    """Write routing figures, ``routing_stats.json`` and ``report.html`` to ``out_dir``.

    The first pass routes with the model's own eval settings; the sweep then re-routes at each of
    ``capacity_factors`` with vanilla routing and, if ``batch_priority`` and the routers support
    it, with BPR (drop maps use the BPR run). Capacity factors a router cannot honour (expert
    choice below one slot) are skipped with a note. The model's routing knobs and train/eval mode
    are left as found. Returns the path of ``report.html``.
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError(NO_MOE_MESSAGE)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = np.asarray(dataset.images)[:max_images]
    labels = np.asarray(dataset.labels)[:max_images]
    class_names = list(dataset.class_names)
    common: dict[str, Any] = {
        "image_size": image_size,
        "channels": channels,
        "batch_size": batch_size,
        "num_classes": len(class_names),
        "progress": progress,
    }
    base = collect_routing(model, images, labels, **common)
    sparse = base.sparse_layers
    figures: list[tuple[Path, str]] = []
    notes: list[str] = []
    sweep: list[dict[str, Any]] = []
    grid, prefix = base.grid_size, base.num_prefix
    if sparse:
        figures.append(
            (
                plot_expert_load(base, out / "expert_load.png"),
                "Fraction of kept assignments per expert; dashed line: uniform load.",
            )
        )
        for index in sparse:
            path = plot_class_expert_heatmap(
                base.layers[index].class_expert,
                class_names,
                index,
                out / f"class_expert_layer{index}.png",
            )
            figures.append(
                (path, f"Block {index}: share of each class's patches per top-choice expert.")
            )
        picks = example_indices(labels, num_examples)
        shown_layers = sorted({sparse[0], sparse[-1]})
        for index in shown_layers:
            layer = base.layers[index]
            path = plot_patch_experts(
                images[picks],
                layer.top1_expert[picks],
                layer.kept[picks],
                grid,
                prefix,
                layer.num_experts,
                out / f"patch_experts_layer{index}.png",
                title=f"Block {index}: top-choice expert per patch",
            )
            figures.append(
                (path, f"Block {index}: patches coloured by top-choice expert; black = dropped.")
            )
        use_bpr = batch_priority and any(hasattr(layers[i].router, "bpr_score") for i in sparse)
        if batch_priority and not use_bpr:
            notes.append("These routers have no Batch Priority Routing; the sweep is vanilla only.")
        sweep, runs, sweep_notes = _run_sweep(
            model, images, labels, common, capacity_factors, use_bpr
        )
        notes += sweep_notes
        if sweep:
            path = plot_capacity_sweep(
                [r["capacity_factor"] for r in sweep],
                [r["accuracy_vanilla"] for r in sweep],
                [r["accuracy_bpr"] for r in sweep] if use_bpr else None,
                out / "capacity_sweep.png",
                compute=[r["compute"] if r["compute"] is not None else math.nan for r in sweep],
            )
            figures.append((path, "Accuracy vs eval capacity factor and vs expert compute."))
            how = "BPR" if use_bpr else "vanilla routing"
            for index in shown_layers:
                path = plot_dropped_maps(
                    images[picks],
                    {cf: run.layers[index].kept[picks] for cf, run in runs.items()},
                    grid,
                    prefix,
                    out / f"dropped_tokens_layer{index}.png",
                    title=f"Block {index}: kept patches under {how}",
                )
                figures.append(
                    (path, f"Block {index}: dropped patches (black) per capacity factor, {how}.")
                )
    else:
        notes.append(
            "No sparse (token- or expert-choice) layers: Soft MoE mixes every token into every "
            "slot, so there are no per-token experts or dropped tokens to draw; metrics only."
        )
    kinds = {
        i: (
            ("expert choice" if base.layers[i].expert_choice else "token choice")
            if i in base.layers
            else "soft"
        )
        for i in layers
    }
    summary = [
        ("model", _describe(model)),
        ("images", f"{base.num_images} ({len(class_names)} classes)"),
        ("tokens per image", f"{base.num_tokens} ({prefix} prefix)"),
        ("accuracy (model's eval routing)", f"{base.accuracy:.4f}"),
    ]
    payload = {
        "accuracy": base.accuracy,
        "num_images": base.num_images,
        "class_names": class_names,
        "layers": {
            str(i): {
                "kind": kinds[i],
                "metrics": base.metrics.get(i, {}),
                **(
                    {
                        "load": base.layers[i].load,
                        "dropped_frac": base.layers[i].dropped_frac,
                        "class_expert": base.layers[i].class_expert,
                        "class_expert_counts": base.layers[i].class_expert_counts,
                    }
                    if i in base.layers
                    else {}
                ),
            }
            for i in layers
        },
        "capacity_sweep": sweep,
        "figures": [p.name for p, _ in figures],
        "notes": notes,
    }
    (out / "routing_stats.json").write_text(json.dumps(_finite(payload), indent=2))
    report = out / "report.html"
    report.write_text(
        render_html(
            title,
            summary,
            _metrics_table(base.metrics, kinds),
            figures,
            notes,
            _sweep_table(sweep) if sweep else "",
        ),
        encoding="utf-8",
    )
    return report
