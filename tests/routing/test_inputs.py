"""The functional routing API rejects bad arguments with a ValueError naming them."""

import pytest
import torch

from visionmoe.routing import (
    ExpertChoiceRouter,
    TokenChoiceRouter,
    expert_choice_assign,
    expert_choice_dispatch,
    top_k_assign,
    top_k_dispatch,
)
from visionmoe.routing.soft import SoftRouter

GATES = torch.softmax(torch.randn(2, 6, 4), dim=-1)  # G=2 groups, S=6 tokens, E=4 experts


@pytest.mark.parametrize("fn", [top_k_dispatch, top_k_assign])
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(k=1, capacity=0), "capacity must be a positive integer.*got 0"),
        (dict(k=1, capacity=-3), "capacity.*got -3"),
        (dict(k=1, capacity=2.5), "capacity.*got 2.5"),
        (dict(k=5, capacity=2), r"k must be an integer in \[1, 4\].*got 5"),
        (dict(k=0, capacity=2), r"k must be an integer in \[1, 4\].*got 0"),
        (dict(k=1, capacity=2, bpr_score="sum_top_k"), "bpr_score.*'max'.*got 'sum_top_k'"),
        (dict(k=1, capacity=2, batch_priority="yes"), "batch_priority.*got 'yes'"),
    ],
)
def test_top_k_functions_reject(fn, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fn(GATES, **kwargs)


@pytest.mark.parametrize("fn", [expert_choice_dispatch, expert_choice_assign])
@pytest.mark.parametrize("capacity", [0, 7, 1.5])
def test_expert_choice_capacity_must_fit_the_group(fn, capacity):
    with pytest.raises(ValueError, match=rf"capacity must be an integer in \[1, 6\].*{capacity}"):
        fn(GATES, capacity)


def test_gates_must_be_three_dimensional():
    with pytest.raises(ValueError, match=r"\(G, S, E\)"):
        top_k_dispatch(GATES[0], 1, 2)
    with pytest.raises(ValueError, match=r"\(G, S, E\)"):
        expert_choice_dispatch(GATES[0], 2)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: SoftRouter(8, num_experts=0), "num_experts must be a positive integer, got 0"),
        (lambda: SoftRouter(8, 4, slots_per_expert=0), "slots_per_expert.*got 0"),
        (lambda: SoftRouter(8, 4, noise_std=float("nan")), "noise_std.*got nan"),
        (lambda: TokenChoiceRouter(8, 0), "num_experts must be a positive integer, got 0"),
        (lambda: TokenChoiceRouter(8, 4, batch_priority="no"), "batch_priority.*got 'no'"),
        (lambda: TokenChoiceRouter(8, 4, renormalize="no"), "renormalize.*got 'no'"),
        (lambda: TokenChoiceRouter(8, 4, capacity_factor=float("inf")), "capacity_factor.*inf"),
        (lambda: TokenChoiceRouter(8, 4, noise_std=float("nan")), "noise_std.*nan"),
        (lambda: TokenChoiceRouter(8, 4, load_weight=-1.0), "load_weight.*-1.0"),
        (lambda: TokenChoiceRouter(8, 4, bpr_score="mx"), "bpr_score.*'mx'"),
        (lambda: ExpertChoiceRouter(8, 4, capacity_factor=float("inf")), "capacity_factor.*inf"),
        (lambda: ExpertChoiceRouter(8, 4, noise_std=-1.0), "noise_std.*-1.0"),
        (lambda: ExpertChoiceRouter(8, 0), "num_experts.*got 0"),
    ],
)
def test_router_constructors_reject(make, message):
    with pytest.raises(ValueError, match=message):
        make()
