"""``inspect`` for a trained run: routing heatmaps, patch overlays and an HTML report."""

from __future__ import annotations

from pathlib import Path


def inspect_run(
    run: str,
    out_dir: str | None = None,
    num_examples: int = 8,
    capacity_factors: tuple[float, ...] = (0.25, 0.5, 1.0),
    max_images: int = 2000,
    progress: bool = True,
) -> Path:
    """Write the routing report of a run (PNG figures + one self-contained ``report.html``).

    Example: ``inspect_run("runs/digits_vmoe-...")`` writes to ``RUN/inspect/``.
    """
    from visionmoe.eval.report import inspect_model
    from visionmoe.train.inputs import load_splits
    from visionmoe.train.run import load_run

    model, config = load_run(run)
    test = load_splits(config.data).test
    out = Path(out_dir) if out_dir else Path(run) / "inspect"
    return inspect_model(
        model,
        test,
        config.model.image_size,
        config.model.in_chans,
        out,
        num_examples=num_examples,
        capacity_factors=tuple(capacity_factors),
        max_images=max_images,
        title=f"Routing report: {config.name}",
        progress=progress,
    )
