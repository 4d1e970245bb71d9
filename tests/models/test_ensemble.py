import math

import torch

import visionmoe
from visionmoe.layers import SparseMoE
from visionmoe.models.ensemble import (
    EnsembleSparseMoE,
    ensemble_log_probs,
    expected_calibration_error,
)


def test_one_member_equals_vmoe_layer_including_noise():
    torch.manual_seed(0)
    dense = SparseMoE(16, 32, 4, 2, 1.0, group_size=20, expert_init="independent")
    e3 = EnsembleSparseMoE(16, 32, 4, 1, 2, 1.0, group_size=20)
    e3.load_state_dict(dense.state_dict())
    x = torch.randn(4, 10, 16)
    for train in (True, False):
        dense.train(train)
        e3.train(train)
        torch.manual_seed(1)
        y1, a1 = dense(x)
        torch.manual_seed(1)
        y2, a2 = e3(x)
        assert torch.allclose(y1, y2, atol=1e-6)
        assert torch.allclose(a1.loss, a2.loss, atol=1e-7)


def test_one_member_model_equals_vmoe_model():
    torch.manual_seed(0)
    vmoe = visionmoe.create_model("vmoe_debug").eval()
    e3 = visionmoe.create_model("vmoe_debug")
    for i in e3.moe_blocks:
        e3.blocks[i].ffn = EnsembleSparseMoE(32, 64, 4, 1, 2, 1.05, group_size=2 * 17)
    e3.load_state_dict(vmoe.state_dict())
    e3.eval()
    x = torch.randn(4, 3, 32, 32)
    assert torch.allclose(vmoe(x), e3(x), atol=1e-6)


def test_members_route_only_to_their_experts_and_tile_once():
    torch.manual_seed(0)
    model = visionmoe.create_model("vmoe_debug", num_experts=4, ensemble_members=2, top_k=1)
    x = torch.randn(3, 3, 32, 32)
    logits, aux = model(x, return_aux=True)
    assert logits.shape == (3, 2, 10)
    for aux_layer in aux.layers.values():
        plan = aux_layer.plan
        member_of_token = (plan.token_idx // 17) % 2
        assert torch.equal(plan.expert_idx // 2, member_of_token)
        per_expert = torch.bincount(plan.expert_idx[plan.keep], minlength=4)
        assert per_expert.max() <= plan.capacity
        # Gates are block-diagonal: a token has zero probability for the other member's experts.
        gates = aux_layer.gates.view(3, 2, 17, 4)
        assert torch.all(gates[:, 0, :, 2:] == 0) and torch.all(gates[:, 1, :, :2] == 0)


def test_member_loss_and_gradients():
    model = visionmoe.create_model("vmoe_debug", ensemble_members=2, top_k=1)
    torch.nn.init.normal_(model.head.weight, std=0.1)
    logits, aux = model(torch.randn(2, 3, 32, 32), return_aux=True)
    from visionmoe.train.loop import classification_loss

    loss = classification_loss(logits, torch.tensor([1, 2]), "softmax") + aux.loss
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_ensemble_prediction_and_nll():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])
    # mean of softmax([2, 0]) = [.8808, .1192] and softmax([0, 1]) = [.2689, .7311]
    expected = torch.tensor([[(0.880797 + 0.268941) / 2, (0.119203 + 0.731059) / 2]])
    assert torch.allclose(ensemble_log_probs(logits).exp(), expected, atol=1e-5)
    nll = -ensemble_log_probs(logits)[0, 0]
    assert math.isclose(float(nll), -math.log(expected[0, 0].item()), rel_tol=1e-5)


def test_ece():
    # Two predictions at confidence 0.9 (one right, one wrong): |0.9 - 0.5| = 0.4.
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1]])
    assert math.isclose(expected_calibration_error(probs, torch.tensor([0, 1])), 0.4, abs_tol=1e-6)
