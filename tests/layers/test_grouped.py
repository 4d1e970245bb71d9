import math

import pytest
import torch

from visionmoe.layers import SparseMoE, grouped
from visionmoe.layers.dispatch import dispatch_compact, dispatch_static, einsum_dispatch
from visionmoe.layers.experts import Experts
from visionmoe.layers.grouped import grouped_mlp
from visionmoe.routing import compute_capacity, top_k_dispatch

COUNTS = [5, 0, 3, 8, 0, 1]  # empty experts in the middle and a one-row expert


def _reference_mlp(x, w1, b1, w2, b2, counts):
    """float64 per expert; tanh GELU: 0.5 h (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3)))."""
    x, w1, b1, w2, b2 = (t.double() for t in (x, w1, b1, w2, b2))
    outs, start = [], 0
    for e, count in enumerate(counts):
        h = x[start : start + count] @ w1[e] + b1[e]
        h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
        outs.append(h @ w2[e] + b2[e])
        start += count
    return torch.cat(outs)


def _inputs(dtype, D=16, F=32):
    torch.manual_seed(0)
    E, N = len(COUNTS), sum(COUNTS)
    tensors = (
        torch.randn(N, D),
        torch.randn(E, D, F) / D**0.5,
        torch.randn(E, F) * 0.1,
        torch.randn(E, F, D) / F**0.5,
        torch.randn(E, D) * 0.1,
    )
    return [t.to(dtype).requires_grad_() for t in tensors]


def _run(inputs, grad_out):
    for t in inputs:
        t.grad = None
    out = grouped_mlp(*inputs, COUNTS, "tanh")
    out.backward(grad_out)
    return out.detach(), [t.grad.clone() for t in inputs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_path_equals_loop_fallback_and_reference(dtype, monkeypatch):
    if not grouped.HAS_GROUPED_MM:
        pytest.skip("torch.nn.functional.grouped_mm needs torch >= 2.9")
    inputs = _inputs(dtype)
    assert grouped.use_grouped_mm(*inputs[::2])  # the fast path really runs below
    grad_out = torch.randn(sum(COUNTS), 16).to(dtype)
    fast, fast_grads = _run(inputs, grad_out)
    monkeypatch.setattr(grouped, "use_grouped_mm", lambda *tensors: False)
    loop, loop_grads = _run(inputs, grad_out)
    # Same GEMMs on the same rows in the same dtype: equal up to summation order.
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(fast.float(), loop.float(), atol=tol, rtol=tol)
    for a, b in zip(fast_grads, loop_grads, strict=True):
        assert a.dtype == dtype and torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)
    # Experts 1 and 4 got no rows: their weight and bias gradients are exactly zero.
    for g in fast_grads[1:]:
        assert g[1].abs().max() == 0 and g[4].abs().max() == 0
    # Against the float64 per-expert formula (value and gradient of sum(out * grad_out)).
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref = _reference_mlp(*ref_inputs, COUNTS)
    ref.backward(grad_out.double())
    assert torch.allclose(fast.double(), ref, atol=5 * tol, rtol=5 * tol)
    for a, r in zip(fast_grads, ref_inputs, strict=True):
        assert torch.allclose(a.double(), r.grad, atol=20 * tol, rtol=5 * tol)


def test_misaligned_rows_fall_back_to_the_loop():
    # 3 fp32 columns = 12-byte rows: grouped_mm refuses that layout, the loop takes over.
    torch.manual_seed(0)
    x = torch.randn(sum(COUNTS), 3, requires_grad=True)
    w1, b1 = torch.randn(6, 3, 4), torch.randn(6, 4)
    w2, b2 = torch.randn(6, 4, 3), torch.randn(6, 3)
    assert not grouped.use_grouped_mm(x, w1, w2)
    out = grouped_mlp(x, w1, b1, w2, b2, COUNTS, "tanh")
    ref = _reference_mlp(x, w1, b1, w2, b2, COUNTS)
    assert torch.allclose(out.double(), ref.detach(), atol=1e-5)


def _float64_reference(layer, x_TD, group_size, k, cf):
    """Einsum reference in float64 on the plan the (float32) router makes."""
    G = x_TD.shape[0] // group_size
    ref_experts = Experts(layer.experts.num_experts, x_TD.shape[1], layer.experts.w1.shape[2])
    ref_experts.load_state_dict(layer.experts.state_dict())
    ref_experts.double()
    x_GSD = x_TD.detach().double().view(G, group_size, -1).requires_grad_()
    gates = torch.softmax(x_GSD @ layer.router.proj.weight.double().T, -1)
    cap = compute_capacity(group_size, layer.router.num_experts, k, cf)
    combine, disp = top_k_dispatch(gates, k, cap)
    y = einsum_dispatch(x_GSD, combine.detach(), disp, ref_experts).reshape(x_TD.shape)
    return y, x_GSD, ref_experts


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_e32_fast_paths_match_float64_einsum_reference(top_k, dtype):
    # E=32 as in the V-MoE paper; bf16 runs under CPU autocast, routing stays float32.
    torch.manual_seed(0)
    T, S, D, F, cf = 256, 128, 32, 64, 1.25
    layer = SparseMoE(D, F, 32, top_k, cf, S, noise_std=0.0, expert_init="independent")
    x_TD = torch.randn(T, D)
    ref, x_ref, ref_experts = _float64_reference(layer, x_TD, S, top_k, cf)
    g_TD = torch.randn(T, D, dtype=torch.float64)
    (ref * g_TD).sum().backward()
    plan, _ = layer.router(x_TD, S)
    plan.weight = plan.weight.detach()
    autocast = dtype == "bfloat16"
    tol = 3e-2 if autocast else 1e-4  # bf16 keeps 8 bits of mantissa
    scale = ref.abs().max().item()
    for path in (dispatch_compact, dispatch_static):
        layer.zero_grad(set_to_none=True)
        x = x_TD.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = path(x, plan, layer.experts)
        assert y.dtype == torch.float32
        assert (y.double() - ref).abs().max() <= tol * scale, path.__name__
        (y.double() * g_TD).sum().backward()
        gx = x_ref.grad.reshape(T, D)
        assert (x.grad.double() - gx).abs().max() <= tol * gx.abs().max(), path.__name__
        for name in ("w1", "b1", "w2", "b2"):
            got, want = getattr(layer.experts, name).grad, getattr(ref_experts, name).grad
            assert got.dtype == torch.float32, name
            assert (got.double() - want).abs().max() <= tol * want.abs().max(), (path, name)


def test_low_precision_weight_cache_follows_parameter_updates():
    torch.manual_seed(0)
    experts = Experts(4, 16, 32, expert_init="independent")
    x_ECD = torch.randn(4, 3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        experts(x_ECD)  # training with grad: cast on every call, nothing cached
        assert experts._cast_cache is None
        experts.eval()
        with torch.no_grad():
            before = experts(x_ECD)
            assert experts._cast_cache is not None
            assert torch.equal(experts(x_ECD), before)
            experts.eval()  # no mode change, no reason to drop the cache
            assert experts._cast_cache is not None
    with torch.no_grad():
        experts.w2.mul_(2.0)  # an in-place update bumps the version counter
        experts.b2.mul_(2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        after = experts(x_ECD)
    # y = act @ W2 + b2 is linear in (W2, b2): doubling both doubles y (exact in bf16).
    assert torch.equal(after, 2 * before)
    experts.load_state_dict({k: torch.zeros_like(v) for k, v in experts.state_dict().items()})
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert experts(x_ECD).abs().max() == 0
    experts.train()
    assert experts._cast_cache is None
