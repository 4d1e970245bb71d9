"""Accuracy, loss and compute spent by a classifier, and top-5 prediction for image files."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from visionmoe.eval.inputs import (
    EvalOptions,
    describe,
    open_for_eval,
    open_model,
    prepare_image,
)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 256,
    precision: str = "fp32",
) -> dict:
    """Evaluate in eval mode; returns accuracy, loss, compute fraction and wall time.

    Runs on the model's device (batches of ``x``, ``y`` are moved there) in ``precision``
    (``fp32`` or ``bf16`` autocast); counts stay on the device until the end.
    ``compute_frac`` is the fraction of token-expert assignments actually processed by the sparse
    MoE layers (1.0 means nothing was dropped), averaged over layers and weighted by tokens.
    For E^3 models (member logits ``(B, M, C)``) accuracy and ``loss`` (NLL) use the ensemble
    prediction ``mean_m softmax(logits_m)``; ``member_accuracy`` and ``ece`` are added.
    """
    batches = ((x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size))
    return evaluate_batches(model, batches, precision)


@torch.no_grad()
def evaluate_batches(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    precision: str = "fp32",
) -> dict:
    """:func:`evaluate` over model-ready ``(x, y)`` batches (e.g. streamed from a loader)."""
    from visionmoe.models.ensemble import ensemble_log_probs, expected_calibration_error
    from visionmoe.runtime import autocast

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    zero = torch.zeros((), dtype=torch.float64, device=device)
    correct, loss_sum, processed, possible, n = zero, zero, zero, 0.0, 0
    member_correct, all_probs, all_targets = None, [], []
    start = time.perf_counter()
    for x, target in batches:
        x = x.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with autocast(device, precision):
            logits, aux = model(x, return_aux=True)
        n += len(target)
        if logits.ndim == 3:
            member_hits = (logits.argmax(-1) == target[:, None]).sum(0)
            member_correct = member_hits if member_correct is None else member_correct + member_hits
            log_probs = ensemble_log_probs(logits)
            all_probs.append(log_probs.exp().cpu())
            all_targets.append(target.cpu())
        else:
            log_probs = torch.log_softmax(logits.float(), -1)
        correct = correct + (log_probs.argmax(-1) == target).sum()
        loss_sum = loss_sum + F.nll_loss(log_probs, target, reduction="sum").double()
        for layer in aux.layers.values():
            if layer.plan is not None:
                processed = processed + layer.metrics["tokens_processed"].double()
                possible += layer.plan.num_tokens * layer.plan.assignments_per_token
    # Counts stay on the device until here: one read for the whole evaluation.
    correct, loss_sum, processed = torch.stack([correct, loss_sum, processed]).tolist()
    seconds = time.perf_counter() - start
    model.train(was_training)
    extra = {}
    if member_correct is not None:
        extra["member_accuracy"] = [c / max(n, 1) for c in member_correct.tolist()]
        extra["ece"] = expected_calibration_error(torch.cat(all_probs), torch.cat(all_targets))
    return {
        **extra,
        "accuracy": int(correct) / max(n, 1),
        "loss": loss_sum / max(n, 1),
        "compute_frac": processed / possible if possible else 1.0,
        "seconds": seconds,
        "images_per_s": n / seconds if seconds > 0 else float("inf"),
        "num_examples": n,
    }


def evaluate_run(
    source: str,
    capacity_factor: float | None = None,
    batch_priority: bool | None = None,
    top_k: int | None = None,
    batch_size: int | None = None,
    *,
    options: EvalOptions | None = None,
) -> dict:
    """Test accuracy and compute spent by any model, optionally with changed routing.

    ``source`` is anything :func:`visionmoe.load_model` opens; ``options`` pick the data
    (``EvalOptions(data=PATH, settings=("data.kind=folder",))``), batch size and image size.
    Example: ``evaluate_run("runs/digits_vmoe-...", capacity_factor=0.5, batch_priority=True)``.
    """
    from visionmoe.models.routing_control import set_routing

    options = options or EvalOptions()
    if batch_size is not None:
        options = replace(options, batch_size=batch_size)
    inputs = open_for_eval(source, options)
    set_routing(
        inputs.model, capacity_factor=capacity_factor, batch_priority=batch_priority, top_k=top_k
    )
    result = evaluate_batches(inputs.model, inputs.batches(), options.precision)
    result.update(capacity_factor=capacity_factor, batch_priority=batch_priority, top_k=top_k)
    result.update(describe(inputs.info), dataset=inputs.splits.name)
    return result


@torch.no_grad()
def predict_files(
    source: str, paths: list[str], top: int = 5, *, options: EvalOptions | None = None
) -> list[dict]:
    """Top-``top`` classes with probabilities for each image file, for any model source (on
    ``options.device``, in ``options.precision``)."""
    import numpy as np
    from PIL import Image

    from visionmoe.runtime import autocast

    options = options or EvalOptions()
    model, info = open_model(source, options)
    device = next(model.parameters()).device
    mode = "L" if info.in_chans == 1 else "RGB"
    out = []
    for path in paths:
        try:
            with Image.open(path) as img:
                array = np.asarray(img.convert(mode))
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read image '{path}': {err}") from None
        if array.ndim == 2:
            array = array[..., None]
        with autocast(device, options.precision):
            logits = model(prepare_image(array, info).to(device))
        probs = torch.softmax(logits.float(), -1)[0].cpu()
        values, index = probs.topk(min(top, len(probs)))
        out.append(
            {
                "path": str(path),
                "top": [
                    {"class": info.class_names[i], "index": int(i), "prob": float(v)}
                    for v, i in zip(values.tolist(), index.tolist(), strict=True)
                ],
            }
        )
    return out
