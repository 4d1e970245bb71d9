"""Shared test settings."""

import pytest
import torch

# A 2-block, width-16 model with one 4-expert MoE block: trains a few steps in a second or two.
TINY_MODEL = [
    "model.hidden_size=16",
    "model.mlp_dim=32",
    "model.num_heads=2",
    "model.num_layers=2",
    "model.moe_layers=1",
    "model.num_experts=4",
    "train.threads=1",
]


@pytest.fixture(scope="session")
def tiny_model() -> list[str]:
    """``--set`` overrides that shrink any recipe's model to :data:`TINY_MODEL`."""
    return list(TINY_MODEL)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: small ops on 2 threads mostly pay for synchronisation."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
