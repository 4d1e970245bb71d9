import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from visionmoe.layers import Mlp, SparseMoE
from visionmoe.layers.dispatch import (
    dispatch_compact,
    dispatch_static,
    einsum_dispatch,
    plan_to_dense,
)
from visionmoe.routing import compute_capacity, expert_choice_dispatch, top_k_dispatch


def _layer(D, E, K, cf, group_size, bpr, router="top_k", **kw):
    torch.manual_seed(0)
    layer = (
        SparseMoE(
            D, 2 * D, E, K, cf, group_size, bpr, router=router, expert_init="independent", **kw
        )
        .double()
        .eval()
    )
    return layer


def _reference(layer, x_TD, group_size, k, cap, bpr, router="top_k"):
    """Einsum reference on equal groups: gates -> dense dispatch/combine -> experts."""
    G = x_TD.shape[0] // group_size
    x_GSD = x_TD.view(G, group_size, -1)
    gates = torch.softmax(x_GSD @ layer.router.proj.weight.T, -1)
    if router == "top_k":
        combine, disp = top_k_dispatch(gates, k, cap, bpr)
    else:
        combine, disp = expert_choice_dispatch(gates, cap)
    return einsum_dispatch(x_GSD, combine, disp, layer.experts).reshape(-1, x_TD.shape[-1]), combine


cases = st.tuples(
    st.integers(1, 3),  # groups
    st.integers(2, 9),  # tokens per group
    st.integers(1, 5),  # experts
    st.integers(1, 2),  # K
    st.sampled_from([0.25, 0.5, 1.0, 4.0]),  # tight to loose capacity
    st.booleans(),  # BPR
)


@settings(max_examples=40, deadline=None)
@given(cases)
def test_index_paths_equal_einsum_reference(case):
    G, S, E, K, cf, bpr = case
    K = min(K, E)
    layer = _layer(8, E, K, cf, S, bpr, capacity_multiple_of=None)
    x = torch.randn(G * S, 8, dtype=torch.float64)
    cap = compute_capacity(S, E, K, cf, "ceil", None)
    y_ref, combine_ref = _reference(layer, x, S, K, cap, bpr)
    plan, _ = layer.router(x, S)
    combine, _ = plan_to_dense(plan, G)
    assert torch.allclose(combine, combine_ref, atol=1e-10, rtol=0)
    for path in (dispatch_static, dispatch_compact):
        assert torch.allclose(path(x, plan, layer.experts), y_ref, atol=1e-10, rtol=0)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 3), st.integers(2, 9), st.integers(1, 5), st.sampled_from([0.5, 1.0, 2.0]))
def test_expert_choice_paths_equal_einsum_reference(G, S, E, cf):
    assume(S * cf / E >= 0.5)  # otherwise round() gives capacity 0, which is refused
    layer = _layer(8, E, 1, cf, S, False, router="expert_choice")
    x = torch.randn(G * S, 8, dtype=torch.float64)
    cap = min(S, compute_capacity(S, E, 1, cf, "round", None))
    y_ref, combine_ref = _reference(layer, x, S, 1, cap, False, "expert_choice")
    plan, _ = layer.router(x, S)
    assert torch.allclose(plan_to_dense(plan, G)[0], combine_ref, atol=1e-10, rtol=0)
    for path in (dispatch_static, dispatch_compact):
        assert torch.allclose(path(x, plan, layer.experts), y_ref, atol=1e-10, rtol=0)


def test_dropped_tokens_get_zero_output():
    layer = _layer(8, 4, 2, 0.25, None, False)
    x = torch.randn(2, 16, 8, dtype=torch.float64)
    y, aux = layer(x)
    keep = aux.plan.keep.view(32, 2).any(-1)
    assert (~keep).any(), "capacity should be tight enough to drop tokens"
    assert torch.all(y.view(32, 8)[~keep] == 0)
    assert aux.metrics["dropped_frac"].item() == pytest.approx((~keep).float().mean().item())


def test_partial_last_group_has_its_own_capacity():
    layer = _layer(8, 4, 1, 1.0, 10, False, capacity_multiple_of=None)
    x = torch.randn(1, 23, 8, dtype=torch.float64)  # groups of 10, 10, 3
    plan, _ = layer.router(x.view(23, 8), 10)
    # cap: ceil(10/4) = 3 for each full group, ceil(3/4) = 1 for the last -> 3 + 3 + 1 slots.
    assert plan.capacity == 7
    for path in (dispatch_static, dispatch_compact):
        y = path(x.view(23, 8), plan, layer.experts)
        assert y.shape == (23, 8)
    assert torch.allclose(
        dispatch_static(x.view(23, 8), plan, layer.experts),
        dispatch_compact(x.view(23, 8), plan, layer.experts),
        atol=1e-12,
    )


def test_identical_experts_with_all_experts_chosen_reproduce_dense_mlp():
    # With shared init, K = E and no dropping, y = MLP(x) * sum_e g_e = MLP(x).
    torch.manual_seed(1)
    E = 4
    layer = SparseMoE(8, 16, E, E, 100.0, None, expert_init="shared").double().eval()
    mlp = Mlp(8, 16).double()
    with torch.no_grad():
        mlp.fc1.weight.copy_(layer.experts.w1[0].T)
        mlp.fc1.bias.copy_(layer.experts.b1[0])
        mlp.fc2.weight.copy_(layer.experts.w2[0].T)
        mlp.fc2.bias.copy_(layer.experts.b2[0])
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    y, _ = layer(x)
    assert torch.allclose(y, mlp(x), atol=1e-12)


def test_routing_is_float32_under_bf16_autocast():
    layer = SparseMoE(16, 32, 4, 2, 1.25, None)
    x = torch.randn(2, 8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = layer(x)
        plan, gates = layer.router(x.view(16, 16).bfloat16())
    assert gates.dtype == torch.float32 and plan.weight.dtype == torch.float32
    assert aux.loss.dtype == torch.float32
    assert y.shape == x.shape


def test_bad_layer_arguments():
    with pytest.raises(ValueError, match="top_k"):
        SparseMoE(8, 16, num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="-0.5"):
        SparseMoE(8, 16, capacity_factor=-0.5)
    with pytest.raises(ValueError, match="group_size"):
        SparseMoE(8, 16, group_size=0)
    with pytest.raises(ValueError, match="'sinkhorn'"):
        SparseMoE(8, 16, router="sinkhorn")
