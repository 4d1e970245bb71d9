"""Per-expert MLPs on expert-sorted rows: grouped GEMMs with a hand-written backward.

Shape legend: N rows sorted by expert, E experts, D width, F hidden width.

The compact dispatch hands the experts N rows sorted by expert, ``counts[e]`` rows for expert e.
Every matrix product of the MLP and of its backward is then one *grouped* GEMM over those row
ranges: ``torch.nn.functional.grouped_mm`` (torch >= 2.9) runs all experts in one call, and an
equivalent loop of ``torch.mm`` (one call per non-empty expert) is the fallback for older torch,
other devices and tensors whose layout ``grouped_mm`` does not accept. Both compute in the dtype
of their inputs (the caller casts: ``grouped_mm`` is not autocast-aware) and write into
preallocated outputs, so autograd never concatenates E outputs or zero-fills E full-size weight
gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

HAS_GROUPED_MM = hasattr(F, "grouped_mm")
GROUPED_DTYPES = (torch.float32, torch.bfloat16)


def gelu_mode(variant: str) -> str:
    """``approximate=`` argument of ``F.gelu`` for a :data:`GELU_VARIANTS` name."""
    return "tanh" if variant == "tanh" else "none"


def _aligned(t: Tensor) -> bool:
    """``grouped_mm`` needs a 16-byte aligned base and 16-byte multiples for the outer strides."""
    size = t.element_size()
    if t.data_ptr() % 16:
        return False
    return sum(s == 1 for s in t.stride()) >= 1 and all(
        s == 1 or (s * size) % 16 == 0 for s in t.stride()
    )


def use_grouped_mm(*tensors: Tensor) -> bool:
    """Whether ``grouped_mm`` applies: available, CPU, fp32/bf16, one dtype, aligned layouts.

    Not under a ``TorchDispatchMode`` (e.g. ``FlopCounterMode``, which has no formula for
    grouped GEMMs): there the loop of ``torch.mm`` runs, which every mode understands.
    """
    if not HAS_GROUPED_MM or is_in_torch_dispatch_mode():
        return False
    first = tensors[0]
    return (
        first.device.type == "cpu"
        and first.dtype in GROUPED_DTYPES
        and all(t.dtype == first.dtype and _aligned(t) for t in tensors)
    )


def group_offsets(counts: list[int], device: torch.device) -> Tensor:
    """(E,) int32 end row of every expert's range, the ``offs`` of ``grouped_mm``."""
    return torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32).to(device)


def rows_mm(a_NK: Tensor, b_EKM: Tensor, counts: list[int], offs: Tensor | None) -> Tensor:
    """(N, M): rows of expert e times ``b_EKM[e]``. ``offs`` None selects the loop fallback."""
    if offs is not None:
        return F.grouped_mm(a_NK, b_EKM, offs=offs)
    out_NM = a_NK.new_empty(a_NK.shape[0], b_EKM.shape[-1])
    start = 0
    for e, count in enumerate(counts):
        if count:
            rows = slice(start, start + count)
            torch.mm(a_NK[rows], b_EKM[e], out=out_NM[rows])
            start += count
    return out_NM


def weight_grad(a_NK: Tensor, g_NM: Tensor, counts: list[int], offs: Tensor | None) -> Tensor:
    """(E, K, M): ``a[rows_e].T @ g[rows_e]`` per expert; zero for experts without rows."""
    E = len(counts)
    if offs is not None:
        out_EKM = F.grouped_mm(a_NK.t(), g_NM, offs=offs)
        for e, count in enumerate(counts):
            if not count:
                out_EKM[e].zero_()
        return out_EKM
    out_EKM = a_NK.new_empty(E, a_NK.shape[1], g_NM.shape[1])
    start = 0
    for e, count in enumerate(counts):
        if count:
            rows = slice(start, start + count)
            torch.mm(a_NK[rows].t(), g_NM[rows], out=out_EKM[e])
            start += count
        else:
            out_EKM[e].zero_()
    return out_EKM


def expert_rows(counts: list[int], device: torch.device) -> Tensor:
    """(N,) expert of every row: ``e`` repeated ``counts[e]`` times."""
    counts_E = torch.tensor(counts, dtype=torch.int64, device=device)
    return torch.repeat_interleave(torch.arange(len(counts), device=device), counts_E)


def add_bias_(x_NM: Tensor, b_EM: Tensor, counts: list[int], expert_N: Tensor | None) -> Tensor:
    """In place: add ``b_EM[e]`` to the rows of expert e (one gather with ``expert_N``)."""
    if expert_N is not None:
        return x_NM.add_(b_EM.index_select(0, expert_N))
    start = 0
    for e, count in enumerate(counts):
        if count:
            x_NM[start : start + count].add_(b_EM[e])
            start += count
    return x_NM


def segment_sum(g_NM: Tensor, counts: list[int]) -> Tensor:
    """(E, M): the sum of every expert's rows (the bias gradient); zero for experts without rows.

    One reduction per non-empty expert (accumulated in float32 for bf16 inputs): measured 2-3x
    faster than a grouped GEMM with a column of ones at E in {8, 32}, fp32 and bf16.
    """
    out_EM = g_NM.new_zeros(len(counts), g_NM.shape[1])
    start = 0
    for e, count in enumerate(counts):
        if count:
            torch.sum(g_NM[start : start + count], dim=0, out=out_EM[e])
            start += count
    return out_EM


class GroupedMlp(torch.autograd.Function):
    """``out = GELU(x W1_e + b1_e) W2_e + b2_e`` on the rows of every expert e.

    Inputs share one dtype (fp32 or bf16; the caller casts) and the GEMMs run in it. Saved for
    backward: the input, the GELU input and output, as for a dense MLP. The backward is six
    grouped GEMMs (weight, bias and input gradients of both layers), so on the ``grouped_mm``
    path the number of launched ops does not grow with E.
    """

    @staticmethod
    def forward(ctx, x_ND, w1_EDF, b1_EF, w2_EFD, b2_ED, counts, variant):
        mode = gelu_mode(variant)
        grouped = x_ND.shape[0] > 0 and use_grouped_mm(x_ND, w1_EDF, w2_EFD)
        offs = group_offsets(counts, x_ND.device) if grouped else None
        expert_N = expert_rows(counts, x_ND.device) if grouped else None
        pre_NF = add_bias_(rows_mm(x_ND, w1_EDF, counts, offs), b1_EF, counts, expert_N)
        act_NF = F.gelu(pre_NF, approximate=mode)
        out_ND = add_bias_(rows_mm(act_NF, w2_EFD, counts, offs), b2_ED, counts, expert_N)
        ctx.save_for_backward(x_ND, w1_EDF, w2_EFD, pre_NF, act_NF)
        ctx.counts, ctx.mode, ctx.grouped = counts, mode, grouped
        return out_ND

    @staticmethod
    def backward(ctx, grad_ND):
        x_ND, w1_EDF, w2_EFD, pre_NF, act_NF = ctx.saved_tensors
        counts = ctx.counts
        grad_ND = grad_ND.contiguous().to(x_ND.dtype)
        grouped = ctx.grouped and use_grouped_mm(grad_ND)
        offs = group_offsets(counts, x_ND.device) if grouped else None
        gw2 = weight_grad(act_NF, grad_ND, counts, offs)
        gb2 = segment_sum(grad_ND, counts)
        g_act_NF = rows_mm(grad_ND, w2_EFD.transpose(1, 2), counts, offs)
        g_pre_NF = torch.ops.aten.gelu_backward(g_act_NF, pre_NF, approximate=ctx.mode)
        del g_act_NF
        gw1 = weight_grad(x_ND, g_pre_NF, counts, offs)
        gb1 = segment_sum(g_pre_NF, counts)
        gx = None
        if ctx.needs_input_grad[0]:
            gx = rows_mm(g_pre_NF, w1_EDF.transpose(1, 2), counts, offs)
        return gx, gw1, gb1, gw2, gb2, None, None


def grouped_mlp(
    x_ND: Tensor,
    w1_EDF: Tensor,
    b1_EF: Tensor,
    w2_EFD: Tensor,
    b2_ED: Tensor,
    counts: list[int],
    variant: str = "tanh",
) -> Tensor:
    """The MLP of every expert on its ``counts[e]`` consecutive rows of ``x_ND`` (N, D)."""
    if sum(counts) != x_ND.shape[0]:
        raise ValueError(f"counts sum to {sum(counts)} but x has {x_ND.shape[0]} rows")
    return GroupedMlp.apply(x_ND, w1_EDF, b1_EF, w2_EFD, b2_ED, counts, variant)
