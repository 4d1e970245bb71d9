"""Router noise scale, eval determinism and the auxiliary losses against float64 references.

The routers draw their noise with ``torch.randn_like``; the tests replace it with a known pattern,
so the expected noisy logits are ``l + sigma * pattern`` with sigma from the spec (section 1.2:
``noise_std / E``; E^3 members: ``noise_std / (E / M)``).
"""

import pytest
import torch

from visionmoe.routing import ExpertChoiceRouter, TokenChoiceRouter
from visionmoe.routing.soft import SoftRouter


def pattern(shape) -> torch.Tensor:
    """Deterministic stand-in for N(0, 1) draws: values spread over [-2, 2], shuffled."""
    n = int(torch.Size(shape).numel())
    steps = (torch.arange(n, dtype=torch.float64) * 7) % n
    return (steps / max(n - 1, 1) * 4 - 2).reshape(shape)


@pytest.fixture
def patterned_noise(monkeypatch):
    calls = []

    def fake(t, **kwargs):
        calls.append(tuple(t.shape))
        return pattern(t.shape).to(t.dtype)

    monkeypatch.setattr(torch, "randn_like", fake)
    return calls


def forbid_noise(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("noise drawn in eval mode")

    monkeypatch.setattr(torch, "randn_like", fail)
    monkeypatch.setattr(torch, "randn", fail)


def cv2(v: torch.Tensor) -> torch.Tensor:
    """(std / mean)^2 with the population std, float64."""
    return v.var(unbiased=False) / v.mean() ** 2


def logits_fixture(T: int, E: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 0.3 * torch.randn(T, E, generator=gen)


def test_token_choice_noise_std_is_noise_std_over_e(patterned_noise):
    # E = 4, noise_std = 2 -> sigma = 0.5. Gates (combine weights) = softmax(l + 0.5 * pattern).
    T, E, K = 6, 4, 2
    router = TokenChoiceRouter(
        3, E, top_k=K, capacity_factor=8.0, noise_std=2.0, importance_weight=0, load_weight=0
    ).train()
    logits = logits_fixture(T, E)
    plan, clean = router.route_logits(logits, None)
    assert patterned_noise == [(1, T, E)]
    gates = torch.softmax(logits.double() + 0.5 * pattern((T, E)), dim=-1)
    top_vals, top_idx = torch.sort(gates, dim=-1, descending=True)
    assert torch.allclose(plan.weight.view(T, K).double(), top_vals[:, :K], atol=1e-6)
    assert torch.equal(plan.expert_idx.view(T, K), top_idx[:, :K])
    # The gates returned for losses and metrics are the clean ones.
    assert torch.allclose(clean.double(), torch.softmax(logits.double(), -1), atol=1e-6)


def test_expert_choice_noise_std_is_noise_std_over_e(patterned_noise):
    # E = 4, noise_std = 2 -> sigma = 0.5; cap = round(8 * 1.0 / 4) = 2 tokens per expert.
    T, E = 8, 4
    router = ExpertChoiceRouter(3, E, capacity_factor=1.0, noise_std=2.0).train()
    logits = logits_fixture(T, E, seed=1)
    plan, _ = router.route_logits(logits, None)
    assert patterned_noise == [(1, T, E)]
    gates = torch.softmax(logits.double() + 0.5 * pattern((T, E)), dim=-1)
    # Each expert takes its 2 highest-gate tokens; slot j holds its j-th best token.
    for e in range(E):
        column = sorted(((gates[t, e].item(), t) for t in range(T)), reverse=True)[:2]
        rows = (plan.expert_idx == e).nonzero().flatten()
        assert plan.token_idx[rows].tolist() == [t for _, t in column]
        assert plan.weight[rows].double().tolist() == pytest.approx([g for g, _ in column])


def test_soft_router_noise_is_noise_std_times_draw(patterned_noise):
    torch.manual_seed(0)
    router = SoftRouter(5, num_experts=3, slots_per_expert=2, noise_std=0.7).train()
    x = torch.randn(2, 4, 5)
    dispatch, combine = router(x)
    eval_dispatch, _ = router.eval()(x)
    clean_logits = torch.log(eval_dispatch.double())  # softmax over tokens: log = logits + c
    noisy = torch.log(dispatch.double())
    # Differences between tokens (the softmax constant cancels) equal 0.7 * pattern differences.
    noise = 0.7 * pattern((2, 4, 3, 2))
    delta = (noisy - clean_logits) - (noisy - clean_logits)[:, :1]
    assert torch.allclose(delta, noise - noise[:, :1], atol=1e-5)


@pytest.mark.parametrize("kind", ["top_k", "expert_choice", "soft"])
def test_eval_mode_draws_no_noise(monkeypatch, kind):
    torch.manual_seed(0)
    if kind == "top_k":
        router = TokenChoiceRouter(5, 4, noise_std=1.0)
    elif kind == "expert_choice":
        router = ExpertChoiceRouter(5, 4, noise_std=1.0)
    else:
        router = SoftRouter(5, 4, noise_std=1.0)
    router.eval()
    x = torch.randn(2, 8, 5) if kind == "soft" else torch.randn(16, 5)
    forbid_noise(monkeypatch)
    if kind == "soft":
        first, second = router(x), router(x)
    else:
        first, second = (router(x, 8)[0].weight,), (router(x, 8)[0].weight,)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def _reference_aux(logits, noise, sigma, k, w_imp, w_load, train):
    """Spec 1.5 per group, float64: w_imp * CV^2(Imp on clean gates) + w_load * CV^2(Load)."""
    logits = logits.double()
    importance = torch.softmax(logits, dim=-1).sum(0)
    aux = w_imp * cv2(importance)
    if train:
        noisy = logits + sigma * noise
        thr = noisy.sort(dim=-1, descending=True).values[:, k - 1 : k]
        load = (1 - torch.special.ndtr((thr - logits) / sigma)).mean(0)
        aux = aux + w_load * cv2(load)
    return aux


@pytest.mark.parametrize("train", [True, False])
def test_aux_loss_is_weighted_importance_plus_load_averaged_over_groups(monkeypatch, train):
    # 3 groups of 5 tokens, E = 4, K = 2, noise_std = 2 -> sigma = 0.5. The router's aux loss is
    # the MEAN over groups of 0.3 * L_imp + 0.7 * L_load (load only in training), with the
    # importance on the clean gates and each group's noise its slice of the drawn pattern.
    G, S, E, K = 3, 5, 4, 2
    monkeypatch.setattr(torch, "randn_like", lambda t, **kw: pattern(t.shape).to(t.dtype))
    router = TokenChoiceRouter(
        3, E, top_k=K, noise_std=2.0, importance_weight=0.3, load_weight=0.7
    ).train(train)
    logits = torch.randn(G * S, E, generator=torch.Generator().manual_seed(3))
    plan, _ = router.route_logits(logits, S)
    noise = pattern((G, S, E))
    per_group = [
        _reference_aux(logits[g * S : (g + 1) * S], noise[g], 0.5, K, 0.3, 0.7, train)
        for g in range(G)
    ]
    expected = torch.stack(per_group).mean()
    assert plan.aux_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # The groups really differ, so a sum or a single group would not pass.
    assert max(per_group) > 1.5 * min(per_group)
