"""Mixture-of-Experts layers: sparse (token choice / expert choice) and Soft MoE.

Shape legend: B batch, L tokens per image, T = B*L tokens, D width, F hidden width, E experts,
P slots per expert (Soft MoE).

Both layers take ``x (B, L, D)`` and return ``(y (B, L, D), MoEAux)``; the model sums the
``aux.loss`` of its layers in one place.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from visionmoe.layers.dispatch import DISPATCH_MODES, dispatch
from visionmoe.layers.experts import Experts
from visionmoe.routing.expert_choice import ExpertChoiceRouter
from visionmoe.routing.plan import RoutingPlan
from visionmoe.routing.soft import SoftRouter
from visionmoe.routing.top_k import TokenChoiceRouter

ROUTERS = ("top_k", "expert_choice")


@dataclass
class MoEAux:
    """What an MoE layer reports besides its output.

    Attributes:
      loss: scalar auxiliary loss, already weighted (0 for routers without one).
      metrics: detached routing statistics, scalars or per-expert vectors.
      plan: the routing decision (sparse layers only), e.g. to colour patches by expert.
      gates: (T, E) softmax of the clean router logits, with gradient (sparse layers only), for
        losses defined on router probabilities (e.g. LIMoE's entropy losses).
    """

    loss: Tensor
    metrics: MutableMapping[str, Tensor] = field(default_factory=dict)
    plan: RoutingPlan | None = None
    gates: Tensor | None = None

    def detached(self) -> MoEAux:
        """A copy holding no autograd graph, to keep for inspection after the step."""
        return MoEAux(
            self.loss.detach(),
            self.metrics,
            None if self.plan is None else self.plan.detached(),
            None if self.gates is None else self.gates.detach(),
        )


class SparseMoE(nn.Module):
    """Sparsely-gated MoE layer (V-MoE): router + index dispatch + expert bank.

    Args:
      dim, hidden_dim, num_experts: D, F, E.
      top_k: experts per token (token choice).
      capacity_factor / eval_capacity_factor: cf for training / eval mode.
      group_size: routing group in tokens (None: one group per call). When T is not a multiple,
        the last group is smaller and gets its own capacity (see ``split_groups``).
      batch_priority: Batch Priority Routing.
      router: ``"top_k"`` (V-MoE) or ``"expert_choice"``.
      dispatch: ``"auto"`` | ``"static"`` | ``"compact"`` (see :mod:`visionmoe.layers.dispatch`).
      router_kwargs: passed on to the router (noise_std, loss weights, capacity rounding, ...).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int = 8,
        top_k: int = 2,
        capacity_factor: float = 1.05,
        group_size: int | None = None,
        batch_priority: bool = False,
        eval_capacity_factor: float | None = None,
        router: str = "top_k",
        dispatch: str = "auto",
        gelu_variant: str = "tanh",
        dropout: float = 0.0,
        expert_init: str = "shared",
        **router_kwargs,
    ):
        super().__init__()
        if router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {router!r}")
        if dispatch not in DISPATCH_MODES:
            raise ValueError(f"dispatch must be one of {DISPATCH_MODES}, got {dispatch!r}")
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive integer, got {num_experts!r}")
        if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
            raise ValueError(
                f"group_size must be a positive integer (tokens) or None, got {group_size!r}"
            )
        self.group_size = group_size
        self.dispatch = dispatch
        if router == "top_k":
            self.router = TokenChoiceRouter(
                dim,
                num_experts,
                top_k,
                capacity_factor,
                eval_capacity_factor,
                batch_priority=batch_priority,
                **router_kwargs,
            )
        else:
            self.router = ExpertChoiceRouter(
                dim, num_experts, capacity_factor, eval_capacity_factor, **router_kwargs
            )
        self.experts = Experts(num_experts, dim, hidden_dim, gelu_variant, dropout, expert_init)

    def forward(self, x_BLD: Tensor) -> tuple[Tensor, MoEAux]:
        B, L, D = x_BLD.shape
        x_TD = x_BLD.reshape(B * L, D)
        plan, gates_TE = self.router(x_TD, self.group_size)
        y_TD = dispatch(x_TD, plan, self.experts, self.dispatch)
        return y_TD.view(B, L, D), MoEAux(plan.aux_loss, plan.metrics, plan, gates_TE)


class SoftMoE(nn.Module):
    """Soft MoE layer: every slot mixes all tokens of an image, every token mixes all slots.

    Args:
      dim, hidden_dim, num_experts: D, F, N.
      slots_per_expert: P; if None it is ``round(num_tokens * capacity_factor / num_experts)``
        (at least 1), which needs ``num_tokens``.
      noise_std: logit noise in training (default off).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int = 128,
        slots_per_expert: int | None = 1,
        num_tokens: int | None = None,
        capacity_factor: float = 1.0,
        noise_std: float = 0.0,
        gelu_variant: str = "tanh",
        dropout: float = 0.0,
        expert_init: str = "shared",
    ):
        super().__init__()
        if slots_per_expert is None:
            if num_tokens is None:
                raise ValueError("SoftMoE needs slots_per_expert or num_tokens to size its slots")
            slots_per_expert = max(1, int(num_tokens * capacity_factor / num_experts + 0.5))
        self.router = SoftRouter(dim, num_experts, slots_per_expert, noise_std)
        self.experts = Experts(num_experts, dim, hidden_dim, gelu_variant, dropout, expert_init)

    def forward(self, x_BMD: Tensor) -> tuple[Tensor, MoEAux]:
        B, M, D = x_BMD.shape
        dispatch_BMNP, combine_BMNP = self.router(x_BMD)
        N, P = dispatch_BMNP.shape[2:]
        slots_NBPD = torch.einsum("bmnp,bmd->nbpd", dispatch_BMNP.to(x_BMD.dtype), x_BMD)
        out_NBPD = self.experts(slots_NBPD.reshape(N, B * P, D)).view(N, B, P, D)
        y_BMD = torch.einsum("bmnp,nbpd->bmd", combine_BMNP.to(out_NBPD.dtype), out_NBPD)
        with torch.no_grad():
            metrics = {
                "combine_min": combine_BMNP.flatten(2).min(-1).values.mean(),
                "combine_max": combine_BMNP.flatten(2).max(-1).values.mean(),
                "dispatch_min": dispatch_BMNP.min(1).values.mean(),
                "dispatch_max": dispatch_BMNP.max(1).values.mean(),
                "scale": self.router.scale.detach().float(),
                "tokens_processed": torch.tensor(float(B * N * P)),
                "compute_frac": torch.tensor(N * P / M),
            }
        return y_BMD.to(x_BMD.dtype), MoEAux(x_BMD.new_zeros((), dtype=torch.float32), metrics)
