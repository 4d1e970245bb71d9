"""The typed result every sparse router returns, and the group bookkeeping shared by routers.

Shape legend: T tokens (B*L, flattened), D width, E experts, K choices per token, G groups,
S tokens per group, C capacity (slots per expert per group), A assignments (token, expert, slot).

A :class:`RoutingPlan` is the index form of the unified router formulation: instead of dense
``(G, S, E, C)`` dispatch/combine tensors it lists A assignments, each sending one token to one slot
of one expert's buffer with a combine weight. Buffers are static: every expert has ``capacity``
slots (summed over groups), so the same plan drives a fixed-shape dispatch (GPU, compile, expert
parallelism) and a compact one that touches only kept assignments (CPU).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from visionmoe.routing.entropy import entropy
from visionmoe.routing.losses import cv_squared


class LazyMetrics(MutableMapping):
    """A metrics dict computed on first access.

    Routing statistics are a dozen small reductions per layer; training logs them every few
    steps and benchmarks never, so the forward pass only records how to compute them.
    """

    def __init__(self, compute: Callable[[], dict[str, Tensor]]):
        self._compute: Callable[[], dict[str, Tensor]] | None = compute
        self._data: dict[str, Tensor] = {}

    def _materialize(self) -> dict[str, Tensor]:
        if self._compute is not None:
            computed, self._compute = self._compute(), None
            self._data = {**computed, **self._data}
        return self._data

    def __getitem__(self, key: str) -> Tensor:
        return self._materialize()[key]

    def __setitem__(self, key: str, value: Tensor) -> None:
        self._data[key] = value

    def __delitem__(self, key: str) -> None:
        del self._materialize()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._materialize())

    def __len__(self) -> int:
        return len(self._materialize())


@dataclass
class RoutingPlan:
    """Where every token goes.

    Attributes:
      token_idx: (A,) token each assignment reads (index into the flattened T tokens).
      expert_idx: (A,) expert of each assignment.
      slot_idx: (A,) position in that expert's buffer, in ``[0, capacity)``; groups occupy
        consecutive ranges of slots.
      weight: (A,) float32 combine weight; 0 where the assignment was dropped.
      keep: (A,) bool; False where the expert's buffer was already full (dropped).
      num_tokens: T.
      num_experts: E.
      capacity: slots per expert summed over groups (the static buffer length).
      assignments_per_token: K for token choice, 1 for expert choice (sets the compute baseline).
      token_major: True when the assignments are listed token by token, K per token
        (``token_idx == arange(T).repeat_interleave(K)``), as token-choice routers emit them; the
        static dispatch then combines by a reshape and a sum instead of a scatter-add.
      aux_loss: scalar auxiliary loss (already weighted, mean over groups).
      metrics: detached routing statistics (see :func:`routing_metrics`).
    """

    token_idx: Tensor
    expert_idx: Tensor
    slot_idx: Tensor
    weight: Tensor
    keep: Tensor
    num_tokens: int
    num_experts: int
    capacity: int
    assignments_per_token: int
    aux_loss: Tensor
    token_major: bool = False
    metrics: MutableMapping[str, Tensor] = field(default_factory=dict)

    def detached(self) -> RoutingPlan:
        """A copy whose tensors hold no autograd graph (``metrics`` is shared)."""
        return replace(self, weight=self.weight.detach(), aux_loss=self.aux_loss.detach())

    @property
    def buffer_idx(self) -> Tensor:
        """(A,) flat position ``expert * capacity + slot`` in an ``(E * capacity, D)`` buffer."""
        return self.expert_idx * self.capacity + self.slot_idx


@dataclass
class GroupSplit:
    """A run of ``num_groups`` equal groups of ``group_size`` tokens starting at token ``start``."""

    start: int
    num_groups: int
    group_size: int


def split_groups(num_tokens: int, group_size: int | None) -> list[GroupSplit]:
    """Cut T tokens into routing groups of ``group_size`` tokens, row-major.

    When T is not a multiple of ``group_size`` (say a last partial batch) the final group is
    smaller and is routed on its own, with a capacity computed from its own size. ``None`` routes
    all tokens as one group.
    """
    if group_size is None or group_size >= num_tokens:
        return [GroupSplit(0, 1, num_tokens)]
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(
            f"group_size must be a positive integer (tokens) or None, got {group_size!r}"
        )
    # // and %, not divmod: under torch.compile with dynamic shapes num_tokens is a SymInt.
    full, rest = num_tokens // group_size, num_tokens % group_size
    splits = [GroupSplit(0, full, group_size)]
    if rest:
        splits.append(GroupSplit(full * group_size, 1, rest))
    return splits


def concat_plans(parts: list[RoutingPlan]) -> RoutingPlan:
    """Join plans routed on consecutive token ranges into one, offsetting tokens and slots."""
    if len(parts) == 1:
        return parts[0]
    token_offset, slot_offset = 0, 0
    tokens, slots = [], []
    for part in parts:
        tokens.append(part.token_idx + token_offset)
        slots.append(part.slot_idx + slot_offset)
        token_offset += part.num_tokens
        slot_offset += part.capacity
    first = parts[0]
    return RoutingPlan(
        token_idx=torch.cat(tokens),
        expert_idx=torch.cat([p.expert_idx for p in parts]),
        slot_idx=torch.cat(slots),
        weight=torch.cat([p.weight for p in parts]),
        keep=torch.cat([p.keep for p in parts]),
        num_tokens=token_offset,
        num_experts=first.num_experts,
        capacity=slot_offset,
        assignments_per_token=first.assignments_per_token,
        token_major=all(p.token_major for p in parts),
        aux_loss=first.aux_loss,  # replaced by the router, which knows the per-group values
    )


def router_precision(x: Tensor) -> Tensor:
    """Cast to at least float32: routing decisions must not depend on bf16/fp16 rounding."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def routing_metrics(
    plan: RoutingPlan, gates_TE: Tensor, mask_T: Tensor | None = None
) -> dict[str, Tensor]:
    """Detached routing statistics: balance, dropping, confidence and buffer use.

    Keys: ``load`` (E,) fraction of kept assignments per expert; ``importance`` (E,) mean gate per
    expert; ``importance_cv2``, ``load_cv2``; ``dropped_frac`` tokens with no kept assignment;
    ``assignments_dropped_frac``; ``router_entropy`` mean per-token entropy; ``marginal_entropy``
    entropy of the mean gate; ``top1_gate``; ``capacity_used`` kept / (E * capacity);
    ``compute_frac`` kept / (T * assignments_per_token); ``tokens_processed`` kept count;
    ``experts_per_token_min`` / ``_max`` kept assignments per token.

    ``mask_T`` (bool, T) restricts every statistic to the selected tokens and their assignments
    (e.g. one modality of a mixed routing pool); it must select at least one token.
    """
    with torch.no_grad():
        selected_A = torch.ones_like(plan.keep) if mask_T is None else mask_T[plan.token_idx]
        keep = (plan.keep & selected_A).float()
        kept = keep.sum()
        num_experts = plan.num_experts
        per_expert_E = torch.zeros(num_experts, device=keep.device).index_add_(
            0, plan.expert_idx, keep
        )
        per_token_T = torch.zeros(plan.num_tokens, device=keep.device).index_add_(
            0, plan.token_idx, keep
        )
        gates_TE = gates_TE.float()
        if mask_T is not None:
            per_token_T, gates_TE = per_token_T[mask_T], gates_TE[mask_T]
        if per_token_T.numel() == 0:
            raise ValueError("routing metrics need at least one token (the mask selects none)")
        load_E = per_expert_E / kept.clamp_min(1.0)
        importance_E = gates_TE.mean(dim=0)
        total = per_token_T.numel() * plan.assignments_per_token
        return {
            "load": load_E,
            "importance": importance_E,
            "load_cv2": cv_squared(load_E),
            "importance_cv2": cv_squared(importance_E),
            "dropped_frac": (per_token_T == 0).float().mean(),
            "assignments_dropped_frac": 1.0 - kept / selected_A.sum().clamp_min(1),
            "router_entropy": entropy(gates_TE).mean(),
            "marginal_entropy": entropy(importance_E),
            "top1_gate": gates_TE.max(dim=-1).values.mean(),
            "capacity_used": kept / max(num_experts * plan.capacity, 1),
            "compute_frac": kept / max(total, 1),
            "tokens_processed": kept,
            "experts_per_token_min": per_token_T.min(),
            "experts_per_token_max": per_token_T.max(),
        }


def lazy_routing_metrics(plan: RoutingPlan, gates_TE: Tensor) -> LazyMetrics:
    """:func:`routing_metrics`, computed when first read (holds no autograd graph)."""
    gates_TE, plan = gates_TE.detach(), plan.detached()
    return LazyMetrics(lambda: routing_metrics(plan, gates_TE))
