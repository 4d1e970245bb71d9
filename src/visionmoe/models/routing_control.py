"""Inference-time routing knobs for adaptive compute (V-MoE section on BPR)."""

from __future__ import annotations

import math

from torch import nn

from visionmoe.layers.moe import SparseMoE


def set_routing(
    model: nn.Module,
    capacity_factor: float | None = None,
    batch_priority: bool | None = None,
    top_k: int | None = None,
) -> nn.Module:
    """Change how every sparse MoE layer of ``model`` routes in eval mode.

    ``capacity_factor`` sets the eval-mode capacity factor (e.g. 0.5 with BPR to halve expert
    compute); ``batch_priority`` turns BPR on or off; ``top_k`` changes the experts per token
    (token-choice layers). ``None`` leaves a knob unchanged. Soft MoE layers have no such knobs
    and are left alone. Returns the model.
    """
    if capacity_factor is not None and (
        isinstance(capacity_factor, bool)
        or not isinstance(capacity_factor, (int, float))
        or not 0 < capacity_factor < math.inf
    ):
        raise ValueError(f"capacity_factor must be a finite number > 0, got {capacity_factor!r}")
    if batch_priority is not None and not isinstance(batch_priority, bool):
        raise ValueError(f"batch_priority must be True, False or None, got {batch_priority!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    for module in model.modules():
        if not isinstance(module, SparseMoE):
            continue
        router = module.router
        if capacity_factor is not None:
            router.eval_capacity_factor = float(capacity_factor)
        if batch_priority is not None and hasattr(router, "bpr_score"):
            router.batch_priority = batch_priority
        if top_k is not None and hasattr(router, "bpr_score"):
            old = router.top_k
            router.top_k = top_k
            try:
                router.validate()
            except ValueError:
                router.top_k = old
                raise
    return model
