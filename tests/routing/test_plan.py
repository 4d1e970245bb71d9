"""routing_metrics: the whole pool, and restricted to a token subset (one LIMoE modality)."""

import pytest
import torch

from visionmoe.routing.plan import RoutingPlan, routing_metrics


def _plan() -> tuple[RoutingPlan, torch.Tensor]:
    # 4 tokens, K=2, E=2, capacity 2: token 3 loses both choices, token 1 its second.
    gates = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.5, 0.5]])
    plan = RoutingPlan(
        token_idx=torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]),
        expert_idx=torch.tensor([0, 1, 0, 1, 1, 0, 0, 1]),
        slot_idx=torch.tensor([0, 0, 1, 2, 1, 2, 3, 3]),
        weight=torch.tensor([0.9, 0.1, 0.6, 0.0, 0.7, 0.0, 0.0, 0.0]),
        keep=torch.tensor([True, True, True, False, True, False, False, False]),
        num_tokens=4,
        num_experts=2,
        capacity=2,
        assignments_per_token=2,
        aux_loss=torch.zeros(()),
    )
    return plan, gates


def test_whole_pool():
    plan, gates = _plan()
    m = routing_metrics(plan, gates)
    assert torch.allclose(m["load"], torch.tensor([0.5, 0.5]))
    assert m["dropped_frac"].item() == pytest.approx(0.25)
    assert m["assignments_dropped_frac"].item() == pytest.approx(0.5)
    assert m["compute_frac"].item() == pytest.approx(0.5)
    assert m["experts_per_token_min"].item() == 0 and m["experts_per_token_max"].item() == 2


def test_mask_restricts_every_statistic_to_the_selected_tokens():
    plan, gates = _plan()
    everything = routing_metrics(plan, gates, torch.ones(4, dtype=torch.bool))
    for key, value in routing_metrics(plan, gates).items():
        assert torch.allclose(everything[key], value), key
    m = routing_metrics(plan, gates, torch.tensor([False, True, False, True]))
    # Tokens 1 and 3: one kept assignment (token 1 -> expert 0) out of four.
    assert torch.allclose(m["load"], torch.tensor([1.0, 0.0]))
    assert torch.allclose(m["importance"], torch.tensor([0.55, 0.45]))
    assert m["dropped_frac"].item() == pytest.approx(0.5)
    assert m["assignments_dropped_frac"].item() == pytest.approx(0.75)
    assert m["compute_frac"].item() == pytest.approx(0.25)
    assert m["tokens_processed"].item() == 1


def test_empty_mask_is_refused():
    plan, gates = _plan()
    with pytest.raises(ValueError, match="at least one token"):
        routing_metrics(plan, gates, torch.zeros(4, dtype=torch.bool))
