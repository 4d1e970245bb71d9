"""Golden values for LIMoE's per-modality entropy losses (arithmetic in the comments)."""

import math

import pytest
import torch

from visionmoe.routing.entropy import entropy, global_entropy_loss, local_entropy_loss

# Tokens 0, 1 are images, token 2 is text.
PROBS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
IMAGE = torch.tensor([True, True, False])
TEXT = ~IMAGE


def test_entropy_golden():
    # Ent([.5, .5]) = log 2; Ent([1, 0]) = 0 (0 log 0 = 0); Ent(uniform over 4) = log 4.
    assert entropy(torch.tensor([0.5, 0.5])).item() == pytest.approx(math.log(2))
    assert entropy(torch.tensor([1.0, 0.0])).item() == pytest.approx(0.0, abs=1e-12)
    assert entropy(torch.full((4,), 0.25)).item() == pytest.approx(math.log(4))


def test_local_entropy_golden():
    # Images: both tokens one-hot -> mean(0, 0) = 0. Text: one token [.5, .5] -> log 2.
    assert local_entropy_loss(PROBS, IMAGE).item() == pytest.approx(0.0, abs=1e-9)
    assert local_entropy_loss(PROBS, TEXT).item() == pytest.approx(math.log(2))
    # All three: (0 + 0 + log 2) / 3.
    all_ = torch.ones(3, dtype=torch.bool)
    assert local_entropy_loss(PROBS, all_).item() == pytest.approx(math.log(2) / 3)


def test_global_entropy_unthresholded_golden():
    # Images: p_bar = ([1,0] + [0,1]) / 2 = [.5, .5] -> -Ent = -log 2 (the minimum for E = 2).
    assert global_entropy_loss(PROBS, IMAGE).item() == pytest.approx(-math.log(2))
    # Two tokens both on expert 0: p_bar = [1, 0] -> -Ent = 0.
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert global_entropy_loss(same, torch.ones(2, dtype=torch.bool)).item() == pytest.approx(
        0.0, abs=1e-9
    )


def test_global_entropy_thresholded_golden():
    # p_bar = [.75, .25, 0, 0]: Ent = -(.75 ln .75 + .25 ln .25) = 0.2157616 + 0.3465736
    # = 0.5623351. tau = log 8 = 2.0794415 -> max(0, 2.0794415 - 0.5623351) = 1.5171064.
    probs = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    mask = torch.ones(2, dtype=torch.bool)
    loss = global_entropy_loss(probs, mask, math.log(8))
    assert loss.item() == pytest.approx(1.5171064, abs=1e-6)
    # tau = 0.5 < Ent -> switched off (0), and tau = 0 is always 0 (hence None for plain -Ent).
    assert global_entropy_loss(probs, mask, 0.5).item() == 0.0
    assert global_entropy_loss(probs, mask, 0.0).item() == 0.0
    assert global_entropy_loss(probs, mask, None).item() == pytest.approx(-0.5623351, abs=1e-6)


def test_gradients_and_empty_modality():
    logits = torch.randn(5, 4, requires_grad=True)
    probs = logits.softmax(-1)
    mask = torch.tensor([True, False, True, False, False])
    (local_entropy_loss(probs, mask) + global_entropy_loss(probs, mask)).backward()
    grad = logits.grad
    assert grad[mask].abs().sum() > 0 and grad[~mask].abs().sum() == 0
    none = torch.zeros(5, dtype=torch.bool)
    assert local_entropy_loss(probs, none).item() == 0.0
    assert global_entropy_loss(probs, none, math.log(8)).item() == 0.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="mask_T"):
        local_entropy_loss(PROBS, torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="threshold"):
        global_entropy_loss(PROBS, IMAGE, -1.0)
