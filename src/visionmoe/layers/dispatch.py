"""Moving tokens to expert buffers and back: two fast index paths and the einsum reference.

Shape legend: T tokens, D width, E experts, C slots per expert (all groups), A assignments,
N kept assignments, G groups, S tokens per group.

- ``static``: copy rows into fixed ``(E, C)`` buffers, one batched matmul, copy back and combine.
  No ``.item()`` / ``nonzero``: shapes depend only on the config, so it suits GPUs, CUDA graphs,
  ``torch.compile(fullgraph=True)`` and all-to-all exchange. Token-choice plans (token-major)
  take a form with no scatter-add in either pass; other plans gather and ``index_add_``.
- ``compact``: keep only the kept assignments, sort them by expert and run one GEMM per expert on
  contiguous rows. Reading the per-expert counts syncs with the host, which costs nothing on CPU,
  and empty slots cost no FLOPs, so compute follows capacity.
- ``einsum_dispatch``: the dense ``(G, S, E, C)`` reference the tests compare against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from visionmoe.layers.experts import Experts, compute_dtype
from visionmoe.routing.plan import RoutingPlan

DISPATCH_MODES = ("auto", "static", "compact")


# On CPU (eager): static when at least this fraction of the E*C slots is filled, else compact.
STATIC_MIN_FILL = 0.85  # float32 training
STATIC_MIN_FILL_BF16 = 0.75  # bf16 training (autocast)
STATIC_MIN_FILL_INFERENCE = 0.9  # no autograd


def resolve_dispatch(mode: str, x: Tensor, plan: RoutingPlan | None = None) -> str:
    """The path ``auto`` takes: ``static`` unless, on CPU, the plan leaves many slots empty.

    ``static`` runs on accelerators and under ``torch.compile`` (fixed shapes, no host sync).
    On CPU in eager mode ``auto`` counts the kept assignments of ``plan`` (a host sync, free on
    CPU) and takes ``static`` when they fill at least :data:`STATIC_MIN_FILL` of the E*C slots in
    float32 training (:data:`STATIC_MIN_FILL_BF16` in bf16 training,
    :data:`STATIC_MIN_FILL_INFERENCE` without autograd), else ``compact``, which computes no empty
    slot. Filled buffers (top-1 at cf 1.0, BPR at cf <= 1, expert choice) run one batched
    matmul; loose capacities (evaluation at cf 2 or 4 fills at most 50% or 25%) run one GEMM per
    expert on the kept rows only. Without a plan the CPU path is ``compact``.

    Measured on 2 CPU cores, E in {8, 32}, top-2, static / compact time: inference, fp32 and
    bf16, 0.95-1.01 at 94-98% filled, 1.01-1.11 at 84-86%, 1.06-1.19 at 79%, 1.7-1.9 at 50%
    and 3.3-3.6 at 25%; bf16 training 0.77-0.94 at 94-98%, 0.90-0.97 at 84-86%, 1.22-1.36 at
    67-74%, 1.6-1.7 at 50%. At 79% filled bf16 training is split: 1.11-1.20 in that sweep, but
    static was ahead in the layer benchmark (top-2 cf 1.25: 0.82-0.93 of compact at E = 32, even
    at E = 8), so it stays static there. fp32 training (``python -m benchmarks.run --only
    layer``): top-1 at cf 1.0 static better in 5 of 6 runs, top-2 at cf 1.25 compact better in
    6 of 6.
    """
    if mode != "auto":
        return mode
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return "static"
    if plan is None:
        return "compact"
    if not torch.is_grad_enabled():
        threshold = STATIC_MIN_FILL_INFERENCE
    elif compute_dtype(x) == torch.bfloat16:
        threshold = STATIC_MIN_FILL_BF16
    else:
        threshold = STATIC_MIN_FILL
    kept = int(plan.keep.sum())
    return "static" if kept >= threshold * plan.num_experts * plan.capacity else "compact"


def dispatch_static(x_TD: Tensor, plan: RoutingPlan, experts: Experts) -> Tensor:
    E, C, T = plan.num_experts, plan.capacity, plan.num_tokens
    buffer_A = plan.buffer_idx
    # Dropped assignments write to a spare row E*C that is never read.
    target_A = torch.where(plan.keep, buffer_A, torch.full_like(buffer_A, E * C))
    x_low = x_TD.to(compute_dtype(x_TD))  # cast T rows once, before the gather copies them
    if plan.token_major:
        return _static_token_major(x_TD, x_low, plan, experts, target_A)
    # Empty slots point at a zero row appended after the T real tokens.
    row_of_slot = torch.full((E * C + 1,), T, dtype=torch.long, device=x_TD.device)
    row_of_slot = row_of_slot.scatter(0, target_A, plan.token_idx)[: E * C]
    x_padded = torch.cat([x_low, x_low.new_zeros(1, x_low.shape[-1])])
    out_ECD = experts(x_padded.index_select(0, row_of_slot).view(E, C, -1))
    out_AD = out_ECD.reshape(E * C, -1).index_select(0, buffer_A)
    return _combine(x_TD, out_AD, plan.weight, plan.token_idx, T)


def _static_token_major(
    x_TD: Tensor, x_low: Tensor, plan: RoutingPlan, experts: Experts, target_A: Tensor
) -> Tensor:
    """Static dispatch of K assignments per token, listed token by token: no scatter-add.

    Kept assignments own distinct slots, so both directions are row copies into distinct rows
    (``index_copy``, whose gradient is a gather) and the combine is a sum over each token's K
    rows. Neither pass accumulates into shared rows, so neither needs atomic adds on a GPU, and
    compiled CPU code has no atomic read-modify-write loops (which made the compiled layer slower
    than eager with ``index_add_``). Dropped assignments go to a spare row past the slots and
    come back as zero rows; empty slots go to a spare row past the assignments.
    """
    E, C, T, K = plan.num_experts, plan.capacity, plan.num_tokens, plan.assignments_per_token
    A, D = T * K, x_low.shape[-1]
    target_TK = target_A.view(T, K)
    slots = x_low.new_zeros(E * C + 1, D)
    for k in range(K):  # K copies of T rows: the backward is K gathers, not a strided sum
        slots.index_copy_(0, target_TK[:, k], x_low)
    out_SD = experts(slots[: E * C].view(E, C, D)).reshape(E * C, D)
    assignment_of_slot = torch.full((E * C + 1,), A, dtype=torch.long, device=x_TD.device)
    assignment_of_slot = assignment_of_slot.scatter(
        0, target_A, torch.arange(A, device=x_TD.device)
    )[: E * C]
    out_AD = out_SD.new_zeros(A + 1, D).index_copy(0, assignment_of_slot, out_SD)[:A]
    weighted = out_AD.to(x_TD.dtype) * plan.weight.to(x_TD.dtype).unsqueeze(-1)
    choices = weighted.view(T, K, D).unbind(1)  # adds, not a reduction over a strided axis
    y_TD = choices[0]
    for choice in choices[1:]:
        y_TD = y_TD + choice
    return y_TD


def dispatch_compact(x_TD: Tensor, plan: RoutingPlan, experts: Experts) -> Tensor:
    kept_N = plan.keep.nonzero().squeeze(1)
    expert_N = plan.expert_idx.index_select(0, kept_N)
    expert_N, order = torch.sort(expert_N, stable=True)
    kept_N = kept_N.index_select(0, order)
    counts = torch.bincount(expert_N, minlength=plan.num_experts).tolist()
    token_N = plan.token_idx.index_select(0, kept_N)
    x_low = x_TD.to(compute_dtype(x_TD))  # cast T rows once, before the gather copies them
    out_ND = experts.forward_chunks(x_low.index_select(0, token_N), counts)
    return _combine(x_TD, out_ND, plan.weight.index_select(0, kept_N), token_N, plan.num_tokens)


def _combine(x_TD: Tensor, out_ND: Tensor, weight_N: Tensor, token_N: Tensor, T: int) -> Tensor:
    """``y[t] = sum of weight * out`` over the rows of token t, in the dtype of ``x_TD``."""
    weighted = out_ND.to(x_TD.dtype) * weight_N.to(x_TD.dtype).unsqueeze(-1)
    return x_TD.new_zeros(T, x_TD.shape[-1]).index_add_(0, token_N, weighted)


def dispatch(x_TD: Tensor, plan: RoutingPlan, experts: Experts, mode: str = "auto") -> Tensor:
    """Run ``experts`` on the assignments of ``plan``; tokens with no kept assignment get 0."""
    if resolve_dispatch(mode, x_TD, plan) == "static":
        return dispatch_static(x_TD, plan, experts)
    return dispatch_compact(x_TD, plan, experts)


def einsum_dispatch(
    x_GSD: Tensor, combine_GSEC: Tensor, dispatch_GSEC: Tensor, experts: Experts
) -> Tensor:
    """Reference MoE output from dense dispatch/combine tensors (every expert sees G*C rows)."""
    G, S, E, C = dispatch_GSEC.shape
    x_EGCD = torch.einsum("gsec,gsd->egcd", dispatch_GSEC.to(x_GSD.dtype), x_GSD)
    y_EGCD = experts(x_EGCD.reshape(E, G * C, -1)).reshape(E, G, C, -1)
    return torch.einsum("gsec,egcd->gsd", combine_GSEC.to(x_GSD.dtype), y_EGCD)


def plan_to_dense(plan: RoutingPlan, num_groups: int) -> tuple[Tensor, Tensor]:
    """``(combine_GSEC, dispatch_GSEC)`` of a plan with equal groups, for comparisons in tests."""
    G = num_groups
    S, C = plan.num_tokens // G, plan.capacity // G
    dense = torch.zeros(G * S, plan.num_experts, C, dtype=torch.float64, device=plan.weight.device)
    keep = plan.keep
    group = plan.token_idx[keep] // S
    local_slot = plan.slot_idx[keep] - group * C
    index = (plan.token_idx[keep], plan.expert_idx[keep], local_slot)
    combine = dense.index_put(index, plan.weight[keep].double(), accumulate=True)
    dispatch_ = dense.index_put(
        index, torch.ones_like(local_slot, dtype=torch.float64), accumulate=True
    )
    shape = (G, S, plan.num_experts, C)
    return combine.view(shape), dispatch_.view(shape)
