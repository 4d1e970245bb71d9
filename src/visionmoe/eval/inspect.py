"""``inspect`` for a trained run: routing heatmaps, patch overlays and an HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from visionmoe.train.config import ExperimentConfig


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

    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(f"num_examples (--examples) must be an integer >= 1, got {num_examples!r}")
    model, config = load_run(run)
    out = Path(out_dir) if out_dir else Path(run) / "inspect"
    if config.text is not None:
        return _inspect_limoe(run, model, config, out, max_images)
    test = load_splits(config.data).test
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


def _inspect_limoe(
    run: str, model: nn.Module, config: ExperimentConfig, out: Path, max_images: int
) -> Path:
    """Expert usage by modality on the run's test pairs, plus its zero-shot accuracy."""
    from visionmoe.data.text import Tokenizer
    from visionmoe.eval.limoe_report import inspect_limoe_model
    from visionmoe.train.contrastive import load_caption_splits

    test = load_caption_splits(config).test
    n = min(len(test), max_images)
    tokens = Tokenizer().encode_batch([c[0] for c in test.captions[:n]], config.text.max_len)
    summary = []
    if config.data.kind == "digits":
        from visionmoe.eval.zeroshot import zeroshot_run

        accuracy = zeroshot_run(run)["accuracy"]
        summary.append(("zero-shot accuracy (digit prompts)", f"{accuracy:.4f}"))
    return inspect_limoe_model(
        model,
        test.images[:n],
        tokens,
        config.model.image_size,
        config.model.in_chans,
        out,
        batch_size=config.train.batch_size,
        title=f"LIMoE routing report: {config.name}",
        summary=summary,
    )
