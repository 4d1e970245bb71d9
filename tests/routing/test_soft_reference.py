"""Soft MoE (spec section 3.1) against a float64 reference written from the formulas."""

import math

import torch

from visionmoe.layers import SoftMoE
from visionmoe.routing import SoftRouter


def nrm(v: torch.Tensor, dim: int) -> torch.Tensor:
    """v * rsqrt(sum v^2 + 1e-6) along dim."""
    return v / torch.sqrt((v * v).sum(dim=dim, keepdim=True) + 1e-6)


def reference_weights(x_BMD, mu_DNP, scale):
    """L = scale * nrm(X) nrm(Phi); dispatch = softmax over tokens, combine over all slots."""
    B, M, _ = x_BMD.shape
    _, N, P = mu_DNP.shape
    logits = scale * torch.einsum("bmd,dnp->bmnp", nrm(x_BMD, -1), nrm(mu_DNP, 0))
    dispatch = torch.softmax(logits, dim=1)
    combine = torch.softmax(logits.reshape(B, M, N * P), dim=-1).reshape(B, M, N, P)
    return dispatch, combine


def gelu_tanh(h):
    return 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))


def inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 5, generator=gen, dtype=torch.float64)
    # Tokens of very different norms: only the cosine (normalised) logits ignore the norm.
    return x * torch.tensor([0.1, 1.0, 10.0, 3.0], dtype=torch.float64)[None, :, None]


def test_router_is_scaled_cosine_of_normalised_tokens_and_slots():
    torch.manual_seed(0)
    router = SoftRouter(5, num_experts=3, slots_per_expert=2).double()
    with torch.no_grad():
        router.scale.fill_(2.5)
        router.mu.mul_(torch.tensor([0.2, 5.0, 1.0], dtype=torch.float64)[None, :, None])
    x = inputs()
    dispatch, combine = router(x)
    ref_dispatch, ref_combine = reference_weights(x, router.mu.detach(), 2.5)
    assert torch.allclose(dispatch, ref_dispatch, atol=1e-12)
    assert torch.allclose(combine, ref_combine, atol=1e-12)


def test_layer_output_is_combine_of_expert_outputs_on_dispatched_slots():
    torch.manual_seed(0)
    layer = SoftMoE(5, 7, num_experts=3, slots_per_expert=2, expert_init="independent").double()
    with torch.no_grad():
        layer.router.scale.fill_(1.7)
    x = inputs()
    y, _ = layer(x)
    dispatch, combine = reference_weights(x, layer.router.mu.detach(), 1.7)
    ex = layer.experts
    slots = torch.einsum("bmnp,bmd->bnpd", dispatch, x)  # each slot: a mix of all tokens
    outs = torch.stack(
        [
            gelu_tanh(slots[:, n] @ ex.w1[n] + ex.b1[n]) @ ex.w2[n] + ex.b2[n]
            for n in range(3)  # expert n processes its own P slots
        ],
        dim=1,
    )
    expected = torch.einsum("bmnp,bnpd->bmd", combine, outs.detach())
    assert torch.allclose(y, expected, atol=1e-10)
