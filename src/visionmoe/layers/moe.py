"""Mixture-of-Experts layers: sparse (token choice / expert choice) and Soft MoE.

Shape legend: B batch, L tokens per image, T = B*L tokens, D width, F hidden width, E experts,
P slots per expert, G routing groups of S tokens (Soft MoE).

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
from visionmoe.routing.plan import RoutingPlan, split_groups
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
    """Soft MoE layer: every slot mixes all tokens of a routing group, every token all slots.

    Routing groups are ``group_size`` consecutive tokens of the row-major ``(B*L, D)`` input, as
    in vmoe, so a group may span several images; when ``B*L`` is not a multiple, the last group is
    smaller and is mixed on its own.

    Args:
      dim, hidden_dim, num_experts: D, F, E.
      slots_per_expert: P; if None it is ``round(num_tokens * capacity_factor / num_experts)``
        (at least 1), which needs ``num_tokens``.
      noise_std: logit noise in training (default off).
      group_size: tokens per routing group (default None: one image per group).
      bf16_dispatch: round the dispatched tokens and the expert outputs to bfloat16 (the sums stay
        in the input dtype), as vmoe's Soft MoE router always does; default off (float32
        dispatch, which differs from vmoe by ~1e-3).
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
        group_size: int | None = None,
        bf16_dispatch: bool = False,
    ):
        super().__init__()
        if slots_per_expert is None:
            if num_tokens is None:
                raise ValueError("SoftMoE needs slots_per_expert or num_tokens to size its slots")
            slots_per_expert = max(1, int(num_tokens * capacity_factor / num_experts + 0.5))
        if group_size is not None and (
            isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1
        ):
            raise ValueError(
                f"group_size must be a positive integer (tokens) or None, got {group_size!r}"
            )
        self.group_size = group_size
        self.bf16_dispatch = bool(bf16_dispatch)
        self.router = SoftRouter(dim, num_experts, slots_per_expert, noise_std)
        self.experts = Experts(num_experts, dim, hidden_dim, gelu_variant, dropout, expert_init)

    def _round(self, x: Tensor) -> Tensor:
        return x.to(torch.bfloat16).to(x.dtype) if self.bf16_dispatch else x

    def _mix(self, x_GSD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Soft MoE over ``G`` groups of ``S`` tokens: ``(y_GSD, dispatch_GSEP, combine_GSEP)``."""
        G, S, D = x_GSD.shape
        dispatch_GSEP, combine_GSEP = self.router(x_GSD)
        E, P = dispatch_GSEP.shape[2:]
        x_GSD_in = self._round(x_GSD)
        slots_EGPD = torch.einsum("gsep,gsd->egpd", dispatch_GSEP.to(x_GSD.dtype), x_GSD_in)
        out_EGPD = self._round(self.experts(slots_EGPD.reshape(E, G * P, D)).view(E, G, P, D))
        y_GSD = torch.einsum("gsep,egpd->gsd", combine_GSEP.to(out_EGPD.dtype), out_EGPD)
        return y_GSD, dispatch_GSEP, combine_GSEP

    def forward(self, x_BLD: Tensor) -> tuple[Tensor, MoEAux]:
        B, L, D = x_BLD.shape
        x_TD = x_BLD.reshape(B * L, D)
        parts, combine_max, combine_min, dispatch_max, dispatch_min = [], [], [], [], []
        groups = 0
        for split in split_groups(B * L, self.group_size or L):
            n = split.num_groups * split.group_size
            x_GSD = x_TD[split.start : split.start + n].view(split.num_groups, split.group_size, D)
            y_GSD, dispatch_GSEP, combine_GSEP = self._mix(x_GSD)
            parts.append(y_GSD.reshape(n, D))
            groups += split.num_groups
            with torch.no_grad():
                combine_max.append(combine_GSEP.flatten(2).max(-1).values.flatten())
                combine_min.append(combine_GSEP.flatten(2).min(-1).values.flatten())
                dispatch_max.append(dispatch_GSEP.max(1).values.flatten())
                dispatch_min.append(dispatch_GSEP.min(1).values.flatten())
        y_TD = torch.cat(parts) if len(parts) > 1 else parts[0]
        E, P = self.router.num_experts, self.router.slots_per_expert
        with torch.no_grad():
            metrics = {
                "combine_min": torch.cat(combine_min).mean(),
                "combine_max": torch.cat(combine_max).mean(),
                "dispatch_min": torch.cat(dispatch_min).mean(),
                "dispatch_max": torch.cat(dispatch_max).mean(),
                "scale": self.router.scale.detach().float(),
                # Filled on the device: torch.tensor(value, device=...) would copy and sync.
                "tokens_processed": torch.full((), float(groups * E * P), device=x_BLD.device),
                "compute_frac": torch.full((), groups * E * P / (B * L), device=x_BLD.device),
            }
        y_BLD = y_TD.view(B, L, D).to(x_BLD.dtype)
        return y_BLD, MoEAux(x_BLD.new_zeros((), dtype=torch.float32), metrics)
