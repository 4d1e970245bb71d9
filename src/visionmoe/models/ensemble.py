"""E^3: efficient ensembles of experts (Allingham et al., arXiv 2110.03360).

Shape legend: B images, M ensemble members, L tokens per image, T tokens, D width, E experts,
C capacity.

Dense blocks before the first MoE block run once; there the batch is tiled M times
(``repeat_interleave``, so the M copies of an image are adjacent) and every later block runs on
B*M sequences. Each MoE layer's E experts are split into M contiguous blocks of E/M; member m's
tokens are routed only to block m by member m's own router (rows ``[m*E/M, (m+1)*E/M)`` of one
``(E, D)`` router weight, so M=1 is exactly V-MoE with the same parameter names), with noise
``1/(E/M)``, capacity per member group, and importance/load losses per member, averaged.
The head yields one prediction per member; the ensemble predicts the mean of member
probabilities.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from visionmoe.layers.dispatch import dispatch
from visionmoe.layers.moe import MoEAux, SparseMoE
from visionmoe.routing.plan import RoutingPlan, lazy_routing_metrics, router_precision
from visionmoe.routing.top_k import TokenChoiceRouter


class MemberRouter(TokenChoiceRouter):
    """Token-choice router whose experts are partitioned among ``num_members`` members."""

    def __init__(self, dim: int, num_experts: int, num_members: int, **kwargs):
        if num_experts % num_members:
            raise ValueError(
                f"num_experts={num_experts} must be divisible by ensemble_members={num_members}"
            )
        self.num_members = num_members
        super().__init__(dim, num_experts, **kwargs)

    @property
    def experts_per_choice(self) -> int:
        return self.num_experts // self.num_members


class EnsembleSparseMoE(SparseMoE):
    """Sparse MoE layer of an E^3 model: input ``(B*M, L, D)`` with member copies adjacent."""

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        num_members: int,
        top_k: int,
        capacity_factor: float,
        group_size: int | None,
        batch_priority: bool = False,
        eval_capacity_factor: float | None = None,
        dispatch: str = "auto",
        gelu_variant: str = "tanh",
        dropout: float = 0.0,
        expert_init: str = "shared",
        **router_kwargs,
    ):
        super().__init__(
            dim,
            hidden_dim,
            num_experts,
            1,
            capacity_factor,
            group_size,
            batch_priority,
            eval_capacity_factor,
            "top_k",
            dispatch,
            gelu_variant,
            dropout,
            expert_init,
        )
        self.num_members = num_members
        self.router = MemberRouter(
            dim,
            num_experts,
            num_members,
            top_k=top_k,
            capacity_factor=capacity_factor,
            eval_capacity_factor=eval_capacity_factor,
            batch_priority=batch_priority,
            **router_kwargs,
        )

    def forward(self, x_BLD: Tensor) -> tuple[Tensor, MoEAux]:
        B, L, D = x_BLD.shape
        M = self.num_members
        if B % M:
            raise ValueError(f"E^3 layer got {B} sequences, not a multiple of {M} members")
        per_member = self.router.experts_per_choice
        device = x_BLD.device
        # (B0, M, L, D) -> (M, B0*L, D): each member's tokens contiguous, in image order.
        x_MTD = x_BLD.view(B // M, M, L, D).transpose(0, 1).reshape(M, -1, D)
        local = torch.arange(x_MTD.shape[1], device=device)
        global_of_local = (local // L * M) * L + local % L  # member 0; member m adds m*L
        weight = self.router.proj.weight
        plans, gates, aux = [], [], []
        with torch.autocast(device_type=device.type, enabled=False):
            x_MTD = router_precision(x_MTD)
            for m in range(M):
                rows = weight[m * per_member : (m + 1) * per_member].to(x_MTD.dtype)
                plan, gates_m = self.router.route_logits(F.linear(x_MTD[m], rows), self.group_size)
                plans.append((m, plan))
                gates.append((m, gates_m))
                aux.append(plan.aux_loss)
        first = plans[0][1]
        merged = RoutingPlan(
            token_idx=torch.cat([global_of_local[p.token_idx] + m * L for m, p in plans]),
            expert_idx=torch.cat([p.expert_idx + m * per_member for m, p in plans]),
            slot_idx=torch.cat([p.slot_idx for _, p in plans]),
            weight=torch.cat([p.weight for _, p in plans]),
            keep=torch.cat([p.keep for _, p in plans]),
            num_tokens=B * L,
            num_experts=self.router.num_experts,
            capacity=first.capacity,
            assignments_per_token=first.assignments_per_token,
            aux_loss=torch.stack(aux).mean(),
        )
        # Block-diagonal gates (T, E) in the original token order, for metrics and inspection.
        gates_TE = x_MTD.new_zeros(B * L, self.router.num_experts)
        for m, g in gates:
            gates_TE[global_of_local + m * L, m * per_member : (m + 1) * per_member] = g
        merged.metrics = lazy_routing_metrics(merged, gates_TE)
        y_TD = dispatch(x_BLD.reshape(B * L, D), merged, self.experts, self.dispatch)
        return y_TD.view(B, L, D), MoEAux(merged.aux_loss, merged.metrics, merged, gates_TE)


def ensemble_log_probs(logits_BMC: Tensor) -> Tensor:
    """``log((1/M) sum_m softmax(logits_m))`` computed in log space, shape (B, C)."""
    M = logits_BMC.shape[1]
    return torch.logsumexp(torch.log_softmax(logits_BMC.float(), dim=-1), dim=1) - math.log(M)


def expected_calibration_error(probs_BC: Tensor, labels_B: Tensor, num_bins: int = 15) -> float:
    """ECE with equal-width confidence bins (15 by default [unverified against the paper])."""
    confidence, prediction = probs_BC.max(dim=-1)
    correct = (prediction == labels_B).float()
    edges = torch.linspace(0, 1, num_bins + 1, device=probs_BC.device)
    ece = probs_BC.new_zeros(())
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            gap = (confidence[in_bin].mean() - correct[in_bin].mean()).abs()
            ece = ece + in_bin.float().mean() * gap
    return float(ece)
