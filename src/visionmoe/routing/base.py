"""What every sparse router shares: a linear gate, capacity factors and per-group routing.

Shape legend: T tokens, D width, E experts, G groups, S tokens per group.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionmoe.routing.plan import (
    RoutingPlan,
    concat_plans,
    lazy_routing_metrics,
    router_precision,
    split_groups,
)


def lecun_normal_(weight: Tensor) -> Tensor:
    """Truncated-normal LeCun init (fan-in), the default for Flax ``Dense`` kernels."""
    std = math.sqrt(1.0 / weight.shape[1]) / 0.87962566103423978
    return nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


class SparseRouter(nn.Module):
    """Base class: ``x (T, D) -> RoutingPlan`` routed independently per group.

    Subclasses implement ``_route_groups(logits_GSE) -> (plan, aux_G, clean_gates_GSE)`` for a
    run of equal groups; this class computes the logits in float32 (or wider) with autocast off,
    cuts the tokens into groups (a smaller last group is routed on its own) and joins the parts.
    """

    def __init__(
        self, dim: int, num_experts: int, capacity_factor: float, eval_capacity_factor: float | None
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("num_experts", num_experts)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.num_experts = num_experts
        self.proj = nn.Linear(dim, num_experts, bias=False)
        lecun_normal_(self.proj.weight)
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor

    @property
    def active_capacity_factor(self) -> float:
        """``eval_capacity_factor`` in eval mode when set, else ``capacity_factor``."""
        if not self.training and self.eval_capacity_factor is not None:
            return self.eval_capacity_factor
        return self.capacity_factor

    def forward(self, x_TD: Tensor, group_size: int | None = None) -> tuple[RoutingPlan, Tensor]:
        """Route T tokens in groups of ``group_size``; returns the plan and clean gates (T, E)."""
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            x_TD = router_precision(x_TD)
            return self.route_logits(F.linear(x_TD, self.proj.weight.to(x_TD.dtype)), group_size)

    def route_logits(self, logits_TE: Tensor, group_size: int | None) -> tuple[RoutingPlan, Tensor]:
        """Route from clean logits (T, E'); E' may be a slice of the experts (E^3 members)."""
        num_experts = logits_TE.shape[-1]
        parts, aux, gates = [], [], []
        for split in split_groups(logits_TE.shape[0], group_size):
            end = split.start + split.num_groups * split.group_size
            logits_GSE = logits_TE[split.start : end].reshape(
                split.num_groups, split.group_size, num_experts
            )
            plan, aux_G, clean_GSE = self._route_groups(logits_GSE)
            parts.append(plan)
            aux.append(aux_G)
            gates.append(clean_GSE.reshape(-1, num_experts))
        plan = concat_plans(parts)
        plan.aux_loss = torch.cat(aux).mean()
        gates_TE = torch.cat(gates)
        plan.metrics = lazy_routing_metrics(plan, gates_TE)
        return plan, gates_TE

    def _route_groups(self, logits_GSE: Tensor) -> tuple[RoutingPlan, Tensor, Tensor]:
        raise NotImplementedError
