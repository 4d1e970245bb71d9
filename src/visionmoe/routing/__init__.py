"""Routers, capacity rules, auxiliary losses and the functional routing API.

Functional reference API (dense ``(G, S, E, C)`` forms, for tests and custom layers):
:func:`top_k_dispatch`, :func:`expert_choice_dispatch`; index forms :func:`top_k_assign`,
:func:`expert_choice_assign`; losses in :mod:`visionmoe.routing.losses`.
"""

from visionmoe.routing import losses
from visionmoe.routing.capacity import compute_capacity
from visionmoe.routing.expert_choice import (
    ExpertChoiceRouter,
    expert_choice_assign,
    expert_choice_dispatch,
)
from visionmoe.routing.plan import RoutingPlan, routing_metrics, split_groups
from visionmoe.routing.soft import SoftRouter
from visionmoe.routing.top_k import TokenChoiceRouter, top_k_assign, top_k_dispatch

__all__ = [
    "ExpertChoiceRouter",
    "RoutingPlan",
    "SoftRouter",
    "TokenChoiceRouter",
    "compute_capacity",
    "expert_choice_assign",
    "expert_choice_dispatch",
    "losses",
    "routing_metrics",
    "split_groups",
    "top_k_assign",
    "top_k_dispatch",
]
