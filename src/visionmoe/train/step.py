"""One optimisation step: loss, gradient accumulation, autocast, clipping, update.

:func:`train_step_device` returns its metrics as 0-dim tensors on the model's device and reads
nothing back to the host, so on a GPU the host keeps queueing kernels: the fit loop averages the
tensors on the device (:class:`visionmoe.train.metrics.MetricsWindow`) and reads them only on log
steps. :func:`train_step` is the same step returning plain floats.

Gradient accumulation splits the step's batch into ``train.grad_accum`` equal micro-batches and
averages their gradients, which equals one step on the whole batch as long as the forward of an
image does not depend on which micro-batch it is in. Two things make it depend: routing groups
that cross a micro-batch boundary (a group of ``group_images`` images is routed together and
competes for one capacity; keep ``batch_size / grad_accum`` a multiple of the group) and random
draws (router noise, dropout), which come in a different order. Under data parallelism only the
last micro-batch's backward synchronises gradients across ranks (DDP ``no_sync``, FSDP2
``set_requires_gradient_sync``); the others accumulate locally.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionmoe.layers.experts import reuse_weight_casts
from visionmoe.runtime import autocast
from visionmoe.train.config import ExperimentConfig


def classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, kind: str, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Softmax cross-entropy, or sigmoid BCE summed over classes (V-MoE upstream).

    ``labels`` are class indices ``(B,)`` or soft targets ``(B, C)`` (mixup), used as given.
    E^3 member logits ``(B, M, C)`` are trained as M models: the loss is averaged over B*M
    predictions against the repeated labels.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 up, f64 kept
    soft = labels.ndim == 2
    if logits.ndim == 3:
        labels = labels.repeat_interleave(logits.shape[1], dim=0)
        logits = logits.reshape(-1, logits.shape[-1])
    if kind == "softmax":
        target = labels.to(logits.dtype) if soft else labels
        return F.cross_entropy(logits, target, label_smoothing=label_smoothing)
    target = labels if soft else F.one_hot(labels, logits.shape[-1])
    target = target.to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / len(labels)


def clip_local(model: nn.Module, max_norm: float | None) -> torch.Tensor:
    """Global-norm gradient clipping in one process; returns the norm before clipping."""
    return torch.nn.utils.clip_grad_norm_(
        model.parameters(), max_norm if max_norm else float("inf")
    )


def predictions(logits: torch.Tensor) -> torch.Tensor:
    """Class predictions; E^3 member logits vote through their mean probability."""
    if logits.ndim == 3:
        return torch.softmax(logits.detach().float(), -1).mean(1).argmax(-1)
    return logits.argmax(-1)


def add_metrics(total: dict[str, Tensor], new: dict[str, Tensor]) -> dict[str, Tensor]:
    """``total + new`` key by key (keys first seen in ``new`` start at its value)."""
    for key, value in new.items():
        total[key] = total[key] + value if key in total else value
    return total


def gradient_sync(model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Whether the backward in this context synchronises gradients across data-parallel ranks.

    DDP (and FSDP1): ``no_sync()`` when disabled. FSDP2 modules: ``set_requires_gradient_sync``
    for the duration. Any other module: nothing to do.
    """
    if enabled:
        if hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
    return contextlib.nullcontext()


def train_step_device(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    config: ExperimentConfig,
    clip_fn: Callable[[nn.Module, float | None], torch.Tensor] = clip_local,
) -> dict[str, Tensor]:
    """One step on ``(x, y)`` (already on the model's device); metrics as device tensors.

    Loss: task loss + summed MoE aux loss, averaged over ``train.grad_accum`` micro-batches.
    ``clip_fn(model, max_norm)`` runs between backward and the update and returns the gradient
    norm; distributed training passes one that first synchronises gradients across ranks.
    Metrics are means over the micro-batches; nothing is read back to the host.
    """
    model.train()
    accum = config.train.grad_accum
    optimizer.zero_grad(set_to_none=True)
    micro = list(zip(x.chunk(accum), y.chunk(accum), strict=True))
    casts = reuse_weight_casts(model) if accum > 1 else contextlib.nullcontext()
    with casts:
        metrics = _accumulate(model, micro, config)
    grad_norm = clip_fn(model, config.optim.grad_clip)
    optimizer.step()
    metrics["train/grad_norm"] = grad_norm.detach()
    return metrics


def _accumulate(model: nn.Module, micro: list, config: ExperimentConfig) -> dict:
    """Forward and backward of every micro-batch; returns the metrics averaged over them."""
    accum = len(micro)
    sums: dict[str, Tensor] = {}
    for i, (x_micro, y_micro) in enumerate(micro):
        last = i == len(micro) - 1
        with gradient_sync(model, last) if len(micro) > 1 else contextlib.nullcontext():
            with autocast(x_micro.device, config.train.precision):
                logits, aux = model(x_micro, return_aux=True)
            task = classification_loss(
                logits, y_micro, config.train.loss, config.train.label_smoothing
            )
            loss = task + aux.loss
            (loss / accum if accum > 1 else loss).backward()
        with torch.no_grad():
            # Soft (mixed) targets count their largest component as the label.
            hard = y_micro.argmax(-1) if y_micro.ndim == 2 else y_micro
            hits = (predictions(logits) == hard).float().mean()
            step_metrics = {
                "train/loss": loss.detach(),
                "train/task_loss": task.detach(),
                "train/aux_loss": aux.loss.detach(),
                "train/accuracy": hits,
                **aux.metric_tensors(),
            }
            add_metrics(sums, step_metrics)
    return {key: value / accum for key, value in sums.items()} if accum > 1 else sums


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    config: ExperimentConfig,
    clip_fn: Callable[[nn.Module, float | None], torch.Tensor] = clip_local,
) -> dict[str, float]:
    """:func:`train_step_device` with the metrics read back as floats (one host sync)."""
    return to_floats(train_step_device(model, optimizer, x, y, config, clip_fn))


def to_floats(metrics: dict[str, Tensor | float]) -> dict[str, float]:
    """Read a dict of 0-dim tensors (any devices) and floats back as floats, in one copy."""
    keys = [k for k, v in metrics.items() if isinstance(v, Tensor)]
    out = {k: float(v) for k, v in metrics.items() if not isinstance(v, Tensor)}
    if keys:
        device = metrics[keys[0]].device
        values = torch.stack([metrics[k].detach().float().to(device) for k in keys]).tolist()
        out.update(zip(keys, values, strict=True))
    return {k: out[k] for k in metrics}
