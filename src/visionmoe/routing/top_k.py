"""Token-choice top-K routing (V-MoE, arXiv 2106.05974) with Batch Priority Routing.

Shape legend: T tokens, D width, E experts, K choices per token, G groups, S tokens per group,
C capacity (slots per expert per group).

Each token picks its K largest softmax gates; the selected gates are the combine weights (not
renormalised over the K picks, unless asked). Buffers fill in k-major order: every token's first
choice is placed before any second choice. With Batch Priority Routing (BPR) the tokens of a group
are visited in descending priority (top-1 gate, or the sum of the top-K gates) instead of
position order, so when capacity is short the least confident tokens are the ones dropped.
The router learns through the combine weights (the gates multiply the expert outputs) and the
auxiliary importance / load losses.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from visionmoe.routing import losses
from visionmoe.routing.base import SparseRouter
from visionmoe.routing.capacity import compute_capacity
from visionmoe.routing.plan import RoutingPlan

BPR_SCORES = ("max", "sum_topk")


def _check_routing_args(gates_GSE: Tensor, k, capacity, batch_priority, bpr_score) -> None:
    """ValueError naming the argument, its value and what is allowed."""
    if gates_GSE.dim() != 3:
        raise ValueError(f"gates must have shape (G, S, E), got {tuple(gates_GSE.shape)}")
    num_experts = gates_GSE.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_experts:
        raise ValueError(f"k must be an integer in [1, {num_experts}] (E experts), got {k!r}")
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ValueError(
            f"capacity must be a positive integer (slots per expert), got {capacity!r}"
        )
    if not isinstance(batch_priority, bool):
        raise ValueError(f"batch_priority must be True or False, got {batch_priority!r}")
    if bpr_score not in BPR_SCORES:
        raise ValueError(f"bpr_score must be one of {BPR_SCORES}, got {bpr_score!r}")


def _priority_order(vals_GSK: Tensor, batch_priority: bool, bpr_score: str) -> Tensor | None:
    """(G, S) visiting order of the tokens in each group, or None for position order."""
    if not batch_priority:
        return None
    score_GS = vals_GSK[..., 0] if bpr_score == "max" else vals_GSK.sum(dim=-1)
    # Stable descending sort: equal priorities keep position order.
    return torch.sort(score_GS, dim=-1, descending=True, stable=True).indices


def _top_k(gates_GSE: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k values and indices with ties broken towards the lower expert index."""
    vals, idx = torch.sort(gates_GSE, dim=-1, descending=True, stable=True)
    return vals[..., :k], idx[..., :k]


def top_k_assign(
    gates_GSE: Tensor,
    k: int,
    capacity: int,
    batch_priority: bool = False,
    bpr_score: str = "max",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Index form of token-choice routing (static shapes, no host syncs).

    Returns ``(expert_GSK, slot_GSK, gate_GSK, keep_GSK)``: the chosen experts, each assignment's
    position in its expert's buffer (may be >= capacity when dropped), the chosen gate values, and
    whether the assignment fits (``slot < capacity``).
    """
    _check_routing_args(gates_GSE, k, capacity, batch_priority, bpr_score)
    G, S, E = gates_GSE.shape
    vals_GSK, expert_GSK = _top_k(gates_GSE, k)
    order_GS = _priority_order(vals_GSK, batch_priority, bpr_score)
    visit_GSK = (
        expert_GSK
        if order_GS is None
        else expert_GSK.gather(1, order_GS.unsqueeze(-1).expand(G, S, k))
    )
    # k-major flattening: all first choices, then all second choices, ...
    flat_GA = visit_GSK.transpose(1, 2).reshape(G, k * S)
    onehot_GAE = F.one_hot(flat_GA, E)
    position_GA = torch.cumsum(onehot_GAE, dim=1).gather(2, flat_GA.unsqueeze(-1)).squeeze(-1) - 1
    slot_GSK = position_GA.reshape(G, k, S).transpose(1, 2)
    if order_GS is not None:
        slot_GSK = torch.empty_like(slot_GSK).scatter_(
            1, order_GS.unsqueeze(-1).expand(G, S, k), slot_GSK
        )
    keep_GSK = slot_GSK < capacity
    return expert_GSK, slot_GSK, vals_GSK, keep_GSK


def top_k_dispatch(
    gates_GSE: Tensor,
    k: int,
    capacity: int,
    batch_priority: bool = False,
    bpr_score: str = "max",
) -> tuple[Tensor, Tensor]:
    """Dense reference form: ``(combine_GSEC, dispatch_GSEC)`` for token-choice routing.

    Written independently of :func:`top_k_assign` (one pass per choice rank, carrying buffer fill
    levels) so the two can check each other. Memory is O(G*S*E*C): for tests and small inputs.
    """
    _check_routing_args(gates_GSE, k, capacity, batch_priority, bpr_score)
    G, S, E = gates_GSE.shape
    vals_GSK, expert_GSK = _top_k(gates_GSE, k)
    order_GS = _priority_order(vals_GSK, batch_priority, bpr_score)
    if order_GS is None:
        order_GS = torch.arange(S, device=gates_GSE.device).expand(G, S)
    inverse_GS = torch.argsort(order_GS, dim=-1)
    dispatch_GSEC = gates_GSE.new_zeros(G, S, E, capacity)
    fill_GE = torch.zeros(G, E, dtype=torch.long, device=gates_GSE.device)
    for rank in range(k):
        chosen_GS = expert_GSK[..., rank].gather(1, order_GS)  # visiting order
        onehot_GSE = F.one_hot(chosen_GS, E)
        slot_GSE = torch.cumsum(onehot_GSE, dim=1) - 1 + fill_GE.unsqueeze(1)
        fill_GE = fill_GE + onehot_GSE.sum(dim=1)
        slot_GS = (slot_GSE * onehot_GSE).sum(dim=-1)
        fits_GS = slot_GS < capacity
        slot_onehot_GSC = F.one_hot(slot_GS.clamp(max=capacity - 1), capacity) * fits_GS[..., None]
        placed_GSEC = onehot_GSE.unsqueeze(-1) * slot_onehot_GSC.unsqueeze(-2)
        dispatch_GSEC = dispatch_GSEC + placed_GSEC.gather(
            1, inverse_GS[..., None, None].expand(G, S, E, capacity)
        ).to(dispatch_GSEC.dtype)
    combine_GSEC = dispatch_GSEC * gates_GSE.unsqueeze(-1)
    return combine_GSEC, dispatch_GSEC


def _check_number(name: str, value) -> None:
    """A finite number >= 0 (noise std, loss weights)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


class TokenChoiceRouter(SparseRouter):
    """Noisy top-K softmax router (V-MoE) with optional Batch Priority Routing.

    Args:
      dim: token width D.
      num_experts: E.
      top_k: K experts per token.
      capacity_factor: cf used in training.
      eval_capacity_factor: cf used in eval mode (None: same as ``capacity_factor``).
      noise_std: router noise is ``N(0, (noise_std / E)^2)`` added to the logits in training only.
      batch_priority: BPR on/off (V-MoE trains without it and turns it on at inference).
      bpr_score: ``"max"`` (top-1 gate, the reference) or ``"sum_topk"`` [unverified alternative].
      renormalize: divide each token's K gates by their sum (GShard-style); off in V-MoE.
      capacity_rounding, capacity_multiple_of: see :func:`compute_capacity`.
      importance_weight, load_weight, gshard_weight, z_loss_weight: auxiliary loss weights.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 2,
        capacity_factor: float = 1.05,
        eval_capacity_factor: float | None = None,
        noise_std: float = 1.0,
        batch_priority: bool = False,
        bpr_score: str = "max",
        renormalize: bool = False,
        capacity_rounding: str = "ceil",
        capacity_multiple_of: int | None = 4,
        importance_weight: float = 0.005,
        load_weight: float = 0.005,
        gshard_weight: float = 0.0,
        z_loss_weight: float = 0.0,
    ) -> None:
        if bpr_score not in BPR_SCORES:
            raise ValueError(f"bpr_score must be one of {BPR_SCORES}, got {bpr_score!r}")
        _check_number("noise_std", noise_std)
        super().__init__(dim, num_experts, capacity_factor, eval_capacity_factor)
        self.top_k = top_k
        self.noise_std = noise_std
        self.batch_priority = batch_priority
        self.bpr_score = bpr_score
        self.renormalize = renormalize
        self.capacity_rounding = capacity_rounding
        self.capacity_multiple_of = capacity_multiple_of
        self.importance_weight = importance_weight
        self.load_weight = load_weight
        self.gshard_weight = gshard_weight
        self.z_loss_weight = z_loss_weight
        for name in ("importance_weight", "load_weight", "gshard_weight", "z_loss_weight"):
            _check_number(name, getattr(self, name))
        self.validate()

    def validate(self) -> None:
        """Check the (possibly changed at inference) routing knobs."""
        if (
            isinstance(self.top_k, bool)
            or not isinstance(self.top_k, int)
            or not (1 <= self.top_k <= self.experts_per_choice)
        ):
            raise ValueError(
                f"top_k must be an integer in [1, {self.experts_per_choice}] (the experts a "
                f"token can choose from), "
                f"got {self.top_k!r}"
            )
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is None and name == "eval_capacity_factor":
                continue
            if (
                not isinstance(value, (int, float))
                or isinstance(value, bool)
                or not 0 < value < math.inf
            ):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name in ("batch_priority", "renormalize"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.bpr_score not in BPR_SCORES:
            raise ValueError(f"bpr_score must be one of {BPR_SCORES}, got {self.bpr_score!r}")

    @property
    def experts_per_choice(self) -> int:
        """Experts one token chooses among (all of them; E/M for an E^3 member)."""
        return self.num_experts

    def _route_groups(self, logits_GSE: Tensor) -> tuple[RoutingPlan, Tensor, Tensor]:
        G, S, E = logits_GSE.shape
        k = self.top_k
        sigma = self.noise_std / E
        noisy = self.training and sigma > 0
        noisy_GSE = logits_GSE + sigma * torch.randn_like(logits_GSE) if noisy else logits_GSE
        gates_GSE = torch.softmax(noisy_GSE, dim=-1)
        clean_GSE = torch.softmax(logits_GSE, dim=-1) if noisy else gates_GSE
        capacity = compute_capacity(
            S, E, k, self.active_capacity_factor, self.capacity_rounding, self.capacity_multiple_of
        )
        expert_GSK, slot_GSK, gate_GSK, keep_GSK = top_k_assign(
            gates_GSE, k, capacity, self.batch_priority, self.bpr_score
        )
        if self.renormalize:
            gate_GSK = gate_GSK / gate_GSK.sum(dim=-1, keepdim=True).clamp_min(1e-9)
        group_G11 = torch.arange(G, device=logits_GSE.device).view(G, 1, 1)
        plan = RoutingPlan(
            token_idx=torch.arange(G * S, device=logits_GSE.device).repeat_interleave(k),
            expert_idx=expert_GSK.reshape(-1),
            slot_idx=(group_G11 * capacity + slot_GSK.clamp(max=capacity - 1)).reshape(-1),
            weight=(gate_GSK * keep_GSK).reshape(-1),
            keep=keep_GSK.reshape(-1),
            num_tokens=G * S,
            num_experts=E,
            capacity=G * capacity,
            assignments_per_token=k,
            aux_loss=logits_GSE.new_zeros(()),
            token_major=True,
        )
        aux_G = logits_GSE.new_zeros(G)
        if self.importance_weight:
            aux_G = aux_G + self.importance_weight * losses.importance_loss(clean_GSE)
        if self.load_weight and noisy:
            aux_G = aux_G + self.load_weight * losses.load_loss(logits_GSE, noisy_GSE, sigma, k)
        if self.gshard_weight:
            aux_G = aux_G + self.gshard_weight * losses.gshard_loss(gates_GSE)
        if self.z_loss_weight:
            aux_G = aux_G + self.z_loss_weight * losses.z_loss(logits_GSE)
        return plan, aux_G, clean_GSE
