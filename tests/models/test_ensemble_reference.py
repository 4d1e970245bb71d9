"""E^3 (spec section 7.1) with M = 2 against a per-member float64 reference, and tiling order."""

import math

import pytest
import torch

import visionmoe
from visionmoe.models.ensemble import EnsembleSparseMoE


def pattern(shape) -> torch.Tensor:
    """Deterministic stand-in for N(0, 1) draws (the routers draw with torch.randn_like)."""
    n = int(torch.Size(shape).numel())
    return ((torch.arange(n, dtype=torch.float64) * 7) % n / max(n - 1, 1) * 4 - 2).reshape(shape)


def gelu_tanh(h):
    return 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))


def cv2(v):
    return v.var(unbiased=False) / v.mean() ** 2


def test_two_members_match_per_member_reference(monkeypatch):
    # E = 4 experts, M = 2 members -> member m owns experts [2m, 2m+2) and router rows [2m, 2m+2).
    # noise_std = 2 -> member sigma = 2 / (E / M) = 1 (not 2 / E = 0.5). K = 1, no dropping.
    # Input: B0 = 3 images tiled to 6 sequences, copies adjacent: sequence b*M + m is member m's.
    monkeypatch.setattr(torch, "randn_like", lambda t, **kw: pattern(t.shape).to(t.dtype))
    torch.manual_seed(0)
    D, F, E, M, L, B0 = 6, 8, 4, 2, 3, 3
    layer = EnsembleSparseMoE(
        D,
        F,
        E,
        M,
        top_k=1,
        capacity_factor=8.0,
        group_size=None,
        expert_init="independent",
        noise_std=2.0,
        importance_weight=0.3,
        load_weight=0.7,
    ).double()
    x = torch.randn(B0 * M, L, D, dtype=torch.float64)
    y, aux = layer.train()(x)
    w = layer.router.proj.weight.detach()
    ex = layer.experts
    expected = torch.zeros_like(x)
    member_aux = []
    for m in range(M):
        tokens = x[m::M].reshape(B0 * L, D)  # member m's tokens, image by image
        logits = tokens @ w[2 * m : 2 * m + 2].T
        noisy = logits + 1.0 * pattern((1, B0 * L, 2))[0]
        gates = torch.softmax(noisy, dim=-1)
        top = gates.argmax(dim=-1)
        for t in range(B0 * L):
            e = 2 * m + int(top[t])
            h = gelu_tanh(tokens[t] @ ex.w1[e] + ex.b1[e]) @ ex.w2[e] + ex.b2[e]
            b, pos = divmod(t, L)
            expected[b * M + m, pos] = gates[t, top[t]] * h.detach()
        # Per-member losses over its S/M tokens and E/M experts (spec 1.5), K = 1.
        importance = torch.softmax(logits, dim=-1).sum(0)
        thr = noisy.max(dim=-1, keepdim=True).values
        load = (1 - torch.special.ndtr((thr - logits) / 1.0)).mean(0)
        member_aux.append(0.3 * cv2(importance) + 0.7 * cv2(load))
    assert torch.allclose(y, expected, atol=1e-10)
    # The layer's loss is the MEAN over members (not the sum).
    assert aux.loss.item() == pytest.approx(torch.stack(member_aux).mean().item(), rel=1e-6)
    assert abs(member_aux[0] - member_aux[1]) > 1e-3


def test_member_copies_of_an_image_are_adjacent():
    # Make member 1 an exact copy of member 0 (router rows and experts): then the two member
    # predictions of every image must be identical. If the copies were not adjacent (tiling with
    # repeat instead of repeat_interleave) member predictions would come from different images.
    torch.manual_seed(0)
    model = visionmoe.create_model("vmoe_debug", num_experts=4, ensemble_members=2, top_k=1)
    with torch.no_grad():
        for layer in model.moe_blocks.values():
            layer.router.proj.weight[2:4] = layer.router.proj.weight[0:2]
            for p in (layer.experts.w1, layer.experts.b1, layer.experts.w2, layer.experts.b2):
                p.normal_(std=0.5)
                p[2:4] = p[0:2]
        torch.nn.init.normal_(model.head.weight)  # the zero-init head would hide everything
    x = torch.randn(3, 3, 32, 32)
    logits = model.eval()(x)
    assert logits.shape == (3, 2, 10)
    assert torch.allclose(logits[:, 0], logits[:, 1], atol=1e-5)
    assert not torch.allclose(logits[0, 0], logits[1, 0], atol=1e-3)  # images do differ
