"""Expert Choice routing (Zhou et al., arXiv 2202.09368), as used in vision MoEs.

Shape legend: T tokens, D width, E experts, G groups, S tokens per group, C capacity.

Experts pick tokens instead of tokens picking experts: each expert takes the C tokens of its group
with the largest gate for it, so every buffer is exactly full (perfect balance by construction) and
a token may be processed by anywhere from 0 to E experts. ``C = R(S * cf / E)`` (no K factor).
There is no auxiliary loss; the router learns through the combine weights (selected gates).
Routing depends on every token of the group, so keep groups to one image for batch-independent
inference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from visionmoe.routing.base import SparseRouter
from visionmoe.routing.capacity import compute_capacity
from visionmoe.routing.plan import RoutingPlan


def _check_capacity(gates_GSE: Tensor, capacity) -> None:
    if gates_GSE.dim() != 3:
        raise ValueError(f"gates must have shape (G, S, E), got {tuple(gates_GSE.shape)}")
    S = gates_GSE.shape[1]
    if isinstance(capacity, bool) or not isinstance(capacity, int) or not 1 <= capacity <= S:
        raise ValueError(
            f"capacity must be an integer in [1, {S}] (an expert picks at most the S={S} tokens "
            f"of its group), got {capacity!r}"
        )


def expert_choice_assign(gates_GSE: Tensor, capacity: int) -> tuple[Tensor, Tensor]:
    """Index form: ``(token_GEC, gate_GEC)``, the tokens each expert picks and their gates."""
    _check_capacity(gates_GSE, capacity)
    gate_GEC, token_GEC = torch.topk(gates_GSE.transpose(1, 2), capacity, dim=-1)
    return token_GEC, gate_GEC


def expert_choice_dispatch(gates_GSE: Tensor, capacity: int) -> tuple[Tensor, Tensor]:
    """Dense reference form: ``(combine_GSEC, dispatch_GSEC)`` for expert-choice routing."""
    _check_capacity(gates_GSE, capacity)
    G, S, E = gates_GSE.shape
    token_GEC, _ = expert_choice_assign(gates_GSE, capacity)
    dispatch_GECS = F.one_hot(token_GEC, S).to(gates_GSE.dtype)
    dispatch_GSEC = dispatch_GECS.permute(0, 3, 1, 2)
    return dispatch_GSEC * gates_GSE.unsqueeze(-1), dispatch_GSEC


class ExpertChoiceRouter(SparseRouter):
    """Softmax expert-choice router with optional training noise (``sigma = noise_std / E``).

    Args:
      dim, num_experts: D and E.
      capacity_factor / eval_capacity_factor: cf in training / eval (None: same).
      noise_std: as for token choice; vision comparisons use 1.0.
      capacity_rounding, capacity_multiple_of: defaults ``("round", None)`` as in the vision
        comparisons; the capacity is clamped to the group size.
    """

    top_k = 1

    def __init__(
        self,
        dim: int,
        num_experts: int,
        capacity_factor: float = 1.0,
        eval_capacity_factor: float | None = None,
        noise_std: float = 1.0,
        capacity_rounding: str = "round",
        capacity_multiple_of: int | None = None,
    ) -> None:
        for name, value in (
            ("capacity_factor", capacity_factor),
            ("eval_capacity_factor", eval_capacity_factor),
        ):
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not 0 < value < math.inf
            ):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if isinstance(noise_std, bool) or not isinstance(noise_std, (int, float)):
            raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
        if not 0 <= noise_std < math.inf:
            raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
        super().__init__(dim, num_experts, capacity_factor, eval_capacity_factor)
        self.noise_std = noise_std
        self.capacity_rounding = capacity_rounding
        self.capacity_multiple_of = capacity_multiple_of
        self.batch_priority = False

    def _route_groups(self, logits_GSE: Tensor) -> tuple[RoutingPlan, Tensor, Tensor]:
        G, S, E = logits_GSE.shape
        sigma = self.noise_std / E
        noisy = self.training and sigma > 0
        noisy_GSE = logits_GSE + sigma * torch.randn_like(logits_GSE) if noisy else logits_GSE
        gates_GSE = torch.softmax(noisy_GSE, dim=-1)
        capacity = min(
            S,
            compute_capacity(
                S,
                E,
                1,
                self.active_capacity_factor,
                self.capacity_rounding,
                self.capacity_multiple_of,
            ),
        )
        token_GEC, gate_GEC = expert_choice_assign(gates_GSE, capacity)
        device = logits_GSE.device
        group_G11 = torch.arange(G, device=device).view(G, 1, 1)
        expert_GEC = torch.arange(E, device=device).view(1, E, 1).expand(G, E, capacity)
        slot_GEC = (group_G11 * capacity + torch.arange(capacity, device=device)).expand(
            G, E, capacity
        )
        plan = RoutingPlan(
            token_idx=(group_G11 * S + token_GEC).reshape(-1),
            expert_idx=expert_GEC.reshape(-1),
            slot_idx=slot_GEC.reshape(-1),
            weight=gate_GEC.reshape(-1),
            keep=torch.ones(G * E * capacity, dtype=torch.bool, device=device),
            num_tokens=G * S,
            num_experts=E,
            capacity=G * capacity,
            assignments_per_token=1,
            aux_loss=logits_GSE.new_zeros(()),
        )
        clean_GSE = torch.softmax(logits_GSE, dim=-1) if noisy else gates_GSE
        return plan, logits_GSE.new_zeros(G), clean_GSE
