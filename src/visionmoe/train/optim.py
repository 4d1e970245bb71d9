"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from visionmoe.train.config import OptimConfig, ScheduleConfig

_NO_DECAY = ("pos_embed", "cls_token", "probe")


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    """AdamW or SGD; with ``decay_kernels_only`` weight decay skips biases, norms and embeddings.

    AdamW uses the fused kernel where the parameters allow it (see :func:`fused_available`); build
    the optimizer after moving the model to its device.

    AdamW's decoupled decay equals vmoe's "Adam + weight decay added to the update before the LR
    multiply" rule.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_kernel = param.ndim >= 2 and not any(tag in name for tag in _NO_DECAY)
        (decay if is_kernel or not config.decay_kernels_only else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if config.name == "adamw":
        kwargs = dict(lr=config.lr, betas=(config.beta1, config.beta2))
        if fused_available(model):
            # One kernel for the whole update, and the step counters live on the parameters'
            # device: the for-each version reads them on the host every step.
            optimizer = torch.optim.AdamW(groups, fused=True, **kwargs)
            optimizer.register_step_post_hook(mark_params_modified)
            return optimizer
        return torch.optim.AdamW(groups, foreach=True, **kwargs)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, foreach=True)


def mark_params_modified(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Bump the version counter of every parameter after a fused step.

    The fused AdamW kernel updates parameters in place without bumping their autograd version
    counters (torch 2.13), so anything keyed on ``(data_ptr, _version)`` -- such as the cached
    bf16 expert weights of :meth:`visionmoe.layers.experts.Experts.weights` -- would keep serving
    the weights of the first step: bf16 training would run its experts on stale weights and the
    saved checkpoint would not be the model that was evaluated.
    """
    torch.autograd.graph.increment_version(
        [p for group in optimizer.param_groups for p in group["params"]]
    )


def fused_available(model: nn.Module) -> bool:
    """Whether the fused AdamW kernel takes these parameters: floating point, all on CPU or all
    on CUDA (torch >= 2.4 has CPU and CUDA fused kernels)."""
    params = [p for p in model.parameters() if p.requires_grad]
    devices = {p.device.type for p in params}
    return (
        bool(params)
        and len(devices) == 1
        and devices <= {"cpu", "cuda"}
        and all(p.is_floating_point() for p in params)
    )


def learning_rate(step: int, total_steps: int, peak: float, config: ScheduleConfig) -> float:
    """LR at ``step`` (0-based): linear warmup to ``peak``, then the configured decay."""
    warmup = config.warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    if config.name == "constant":
        return peak
    if config.name == "rsqrt":
        return peak / math.sqrt(1 + (step - warmup) / max(warmup, 1))
    progress = min(1.0, (step - warmup) / max(total_steps - warmup, 1))
    if config.name == "linear":
        return config.end_lr + (peak - config.end_lr) * (1 - progress)
    return config.end_lr + (peak - config.end_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
