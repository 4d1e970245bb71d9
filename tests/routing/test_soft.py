import torch

from visionmoe.layers import SoftMoE
from visionmoe.routing import SoftRouter


def test_weights_are_convex_combinations():
    router = SoftRouter(16, 4, 3)
    dispatch, combine = router(torch.randn(2, 9, 16))
    assert dispatch.shape == combine.shape == (2, 9, 4, 3)
    # dispatch: softmax over tokens for each slot; combine: softmax over all slots for each token.
    assert torch.allclose(dispatch.sum(1), torch.ones(2, 4, 3))
    assert torch.allclose(combine.sum((-1, -2)), torch.ones(2, 9))


def test_output_is_token_permutation_equivariant():
    torch.manual_seed(0)
    layer = SoftMoE(16, 32, 4, 2, expert_init="independent").double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    perm = torch.randperm(9)
    y, _ = layer(x)
    y_perm, _ = layer(x[:, perm])
    assert torch.allclose(y[:, perm], y_perm, atol=1e-12)


def test_single_slot_gives_every_token_the_same_output():
    layer = SoftMoE(16, 32, num_experts=1, slots_per_expert=1).double()
    y, aux = layer(torch.randn(3, 7, 16, dtype=torch.float64))
    assert torch.allclose(y, y[:, :1].expand_as(y), atol=1e-12)
    assert aux.loss.item() == 0.0
