"""``inspect`` for a trained run: routing heatmaps, patch overlays and an HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from visionmoe.eval.inputs import EvalOptions, default_out_dir, open_model, with_data

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
    *,
    options: EvalOptions | None = None,
) -> Path:
    """Write the routing report of a model (PNG figures + one self-contained ``report.html``).

    ``run`` is any source :func:`visionmoe.load_model` opens; ``options`` pick the data and
    image size as for ``evaluate_run``. Example: ``inspect_run("runs/digits_vmoe-...")`` writes
    to ``RUN/inspect/`` (``PREFIX_inspect`` beside a vmoe checkpoint).
    """
    from visionmoe.eval.report import inspect_model
    from visionmoe.runtime import autocast

    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(f"num_examples (--examples) must be an integer >= 1, got {num_examples!r}")
    options = options or EvalOptions()
    out = Path(out_dir) if out_dir else default_out_dir(run, "inspect")
    model, info = open_model(run, options)
    with autocast(next(model.parameters()).device, options.precision):
        if info.experiment is not None and info.experiment.text is not None:
            return _inspect_limoe(run, model, info.experiment, out, max_images)
        inputs = with_data(model, info, options)
        name = info.experiment.name if info.experiment else Path(run).name
        return inspect_model(
            model,
            inputs.images(limit=max_images),
            info.preprocess.size,
            info.in_chans,
            out,
            num_examples=num_examples,
            capacity_factors=tuple(capacity_factors),
            max_images=max_images,
            batch_size=inputs.batch_size,
            title=f"Routing report: {name}",
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
