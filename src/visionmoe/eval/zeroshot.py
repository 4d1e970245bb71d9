"""Zero-shot classification with a LIMoE run: classes are described in words, never trained on.

Each class is embedded by encoding several prompts ("the digit 7", "a handwritten seven", ...),
averaging their embeddings and re-normalising (CLIP's prompt ensembling: one phrasing's quirks
average out); an image gets the class whose text embedding has the largest cosine similarity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from visionmoe.data.text import Tokenizer

GENERIC_TEMPLATES = ("a photo of a {}", "an image of a {}", "a picture of the {}", "{}")


def resolve_prompts(
    prompts: Sequence[str] | Sequence[Sequence[str]] | Mapping[str, Sequence[str]] | None,
    class_names: Sequence[str],
) -> list[list[str]]:
    """Per class, its prompts: ``None`` (digit prompts for digit classes, else generic templates),
    templates with ``{}`` for the class name, per-class lists in class order, or a mapping from
    class name to prompts."""
    from visionmoe.data.captions import digit_class_prompts

    names = [str(n) for n in class_names]
    if prompts is None:
        if names == [str(i) for i in range(10)]:
            return digit_class_prompts()
        prompts = GENERIC_TEMPLATES
    if isinstance(prompts, Mapping):
        missing = [n for n in names if n not in prompts]
        if missing:
            raise ValueError(f"no prompts for classes {missing[:5]}")
        return [[str(p) for p in prompts[n]] for n in names]
    prompts = list(prompts)
    if prompts and all(isinstance(p, str) for p in prompts):
        if not all("{}" in p for p in prompts):
            raise ValueError(f"templates must contain '{{}}' for the class name, got {prompts}")
        return [[p.format(n) for p in prompts] for n in names]
    if len(prompts) != len(names) or any(isinstance(p, str) or not p for p in prompts):
        raise ValueError(
            f"expected templates, a mapping, or one non-empty prompt list per class "
            f"({len(names)} classes), got {len(prompts)} entries"
        )
    return [[str(p) for p in per_class] for per_class in prompts]


@torch.no_grad()
def class_embeddings(
    model: torch.nn.Module, prompts: Sequence[Sequence[str]], tokenizer: Tokenizer | None = None
) -> torch.Tensor:
    """(C, J) unit-norm class embeddings: the re-normalised mean of each class's prompts."""
    tokenizer = tokenizer or Tokenizer()
    flat = [p for per_class in prompts for p in per_class]
    tokens = tokenizer.encode_batch(flat, model.text_config.max_len)
    emb = model.encode_text(tokens.to(next(model.parameters()).device)).float()
    out, start = [], 0
    for per_class in prompts:
        out.append(emb[start : start + len(per_class)].mean(dim=0))
        start += len(per_class)
    return torch.nn.functional.normalize(torch.stack(out), dim=-1)


@torch.no_grad()
def zeroshot_accuracy(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    prompts: Sequence[Sequence[str]],
    tokenizer: Tokenizer | None = None,
    batch_size: int = 256,
    precision: str = "fp32",
) -> dict:
    """Accuracy of nearest-class-text prediction on model-ready images ``x`` (eval mode), on the
    model's device in ``precision`` (``fp32`` or ``bf16`` autocast)."""
    from visionmoe.runtime import autocast

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with autocast(device, precision):
            classes = class_embeddings(model, prompts, tokenizer)
            predictions = torch.cat(
                [
                    (model.encode_image(x[i : i + batch_size].to(device)).float() @ classes.T)
                    .argmax(dim=-1)
                    .cpu()
                    for i in range(0, len(x), batch_size)
                ]
            )
    finally:
        model.train(was_training)
    return {
        "accuracy": float((predictions == y).float().mean()) if len(y) else float("nan"),
        "predictions": predictions,
        "num_examples": len(y),
    }


def zeroshot_run(
    run: str,
    prompts: Sequence[str] | Sequence[Sequence[str]] | Mapping[str, Sequence[str]] | None = None,
    dataset: str | None = None,
    data: str | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    precision: str = "fp32",
) -> dict:
    """Zero-shot test accuracy of a LIMoE run on a labelled image dataset (on ``device``: default
    CUDA when available, else CPU; in ``precision``: ``fp32`` or ``bf16``).

    Example: ``zeroshot_run("runs/digits_limoe-...")`` (digits test split, digit prompts), or
    ``zeroshot_run(run, ["a photo of a {}"], dataset="folder", data="my_classes/")``.
    ``dataset`` / ``data`` pick another dataset kind and path (default: the run's digits).
    """
    from visionmoe.loading import load_model
    from visionmoe.models.limoe import LIMoE
    from visionmoe.runtime import check_precision, place_model
    from visionmoe.train.config import DataConfig
    from visionmoe.train.inputs import load_splits, to_tensors

    check_precision(precision)
    model, info = load_model(run)
    model, _ = place_model(model, device)
    config = info.experiment
    if not isinstance(model, LIMoE) or config is None:
        raise ValueError(f"run '{run}' is an image classifier, not an image-text (LIMoE) run")
    if dataset is None and config.data.kind != "digits":
        raise ValueError(
            f"run '{run}' was trained on a caption folder: name a labelled dataset to classify "
            "(dataset=KIND, data=PATH; CLI --dataset/--data)"
        )
    kind = dataset or "digits"
    extra = {"test_fraction": config.data.test_fraction} if kind == "digits" else {}
    splits = load_splits(DataConfig(kind=kind, path=data, **extra))
    per_class = resolve_prompts(prompts, splits.test.class_names)
    test = to_tensors(splits.test, config.model)
    size = batch_size or config.train.eval_batch_size
    result = zeroshot_accuracy(model, test.x, test.y, per_class, None, size, precision)
    return {
        "run": str(run),
        "dataset": splits.name,
        "accuracy": result["accuracy"],
        "num_examples": result["num_examples"],
        "num_classes": len(per_class),
        "prompts_per_class": [len(p) for p in per_class],
        "example_prompts": per_class[0][:3],
    }
