"""Routing report for image-text (LIMoE) models: expert load by modality.

Image and text tokens share one routing pool, so the interesting picture is which experts each
modality uses; :func:`inspect_limoe_model` writes that heatmap, the per-modality routing metrics
as JSON, and the same self-contained HTML report as the image-only inspection.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from visionmoe.eval.plots import _pyplot, _save
from visionmoe.eval.report import _describe, _finite, _fmt, render_html
from visionmoe.eval.routing_stats import collect_modality_routing

__all__ = ["inspect_limoe_model", "plot_modality_expert_heatmap"]

MODALITY_METRICS = (
    "load_cv2",
    "importance_cv2",
    "dropped_frac",
    "router_entropy",
    "marginal_entropy",
    "top1_gate",
    "local_entropy_loss",
    "global_entropy_loss",
    "num_tokens",
)


def plot_modality_expert_heatmap(load: dict[int, np.ndarray], path: Path) -> Path:
    """Per MoE block, a modality x expert heatmap of load: modality-specific experts stand out
    as columns used by one row only (the LIMoE paper's emergent specialisation)."""
    plt = _pyplot()
    blocks = sorted(load)
    E = load[blocks[0]].shape[1]
    fig, axes = plt.subplots(
        len(blocks),
        1,
        figsize=(min(2.5 + 0.5 * E, 24.0), 0.4 + 1.6 * len(blocks)),
        constrained_layout=True,
    )
    for ax, index in zip(np.atleast_1d(axes), blocks, strict=True):
        im = ax.imshow(load[index], cmap="viridis", vmin=0.0, aspect="auto")
        ax.set_yticks([0, 1], ["image", "text"], fontsize=8)
        ax.set_xticks(np.arange(E), [str(e) for e in range(E)], fontsize=7)
        ax.set_title(f"Block {index}: share of each modality's kept tokens per expert", fontsize=9)
        fig.colorbar(im, ax=ax)
    np.atleast_1d(axes)[-1].set_xlabel("expert")
    return _save(fig, path)


def inspect_limoe_model(
    model: nn.Module,
    images: np.ndarray,
    tokens: Any,
    image_size: int,
    channels: int,
    out_dir: str | Path,
    *,
    batch_size: int = 256,
    title: str = "LIMoE routing report",
    summary: Sequence[tuple[str, str]] = (),
) -> Path:
    """Expert usage by modality for an image-text (LIMoE) model: ``modality_expert.png``,
    ``routing_stats.json`` and ``report.html`` (pairs routed together, as in training)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats = collect_modality_routing(model, images, tokens, image_size, channels, batch_size)
    figure = plot_modality_expert_heatmap(stats.load, out / "modality_expert.png")
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["block", "modality", *MODALITY_METRICS])
    rows = []
    for index in sorted(stats.metrics):
        for modality in ("image", "text", "mixed"):
            values = stats.metrics[index].get(modality, {})
            cells = "".join(f"<td>{_fmt(values.get(c))}</td>" for c in MODALITY_METRICS)
            rows.append(f"<tr><td>{index}</td><td>{modality}</td>{cells}</tr>")
    payload = {
        "num_pairs": stats.num_pairs,
        "layers": {
            str(i): {"load": stats.load[i], "counts": stats.counts[i], "metrics": stats.metrics[i]}
            for i in stats.load
        },
    }
    (out / "routing_stats.json").write_text(json.dumps(_finite(payload), indent=2))
    caption = "Load per expert for image tokens (top row) and non-pad text tokens (bottom row)."
    report = out / "report.html"
    report.write_text(
        render_html(
            title,
            [("model", _describe(model)), ("image-text pairs", str(stats.num_pairs)), *summary],
            f"<table><tr>{head}</tr>{''.join(rows)}</table>",
            [(figure, caption)],
            ["Rows 'mixed' are the whole routing pool (both modalities)."],
        ),
        encoding="utf-8",
    )
    return report
