"""Mixup (vmoe's pairing within chunks, PIPELINE.md 2.7) and the soft-target losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from visionmoe.data.ops import Mixup, mixup
from visionmoe.train.step import classification_loss


def _batch(n: int, classes: int = 5):
    # Image j is the constant j, so a mixed image reveals its weights and partner.
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 2, 2).clone()
    labels = torch.arange(n) % classes
    return images, torch.nn.functional.one_hot(labels, classes).float()


def test_mixup_pairs_next_image_within_each_chunk_with_sorted_weights():
    images, targets = _batch(8)
    config = Mixup(concentration=0.2, chunk_size=4)
    x, y = mixup(images, targets, config, torch.Generator().manual_seed(0))
    assert x.shape == images.shape and y.shape == targets.shape
    torch.testing.assert_close(y.sum(1), torch.ones(8))  # soft targets still sum to 1
    for chunk in (0, 1):
        idx = list(range(4 * chunk, 4 * chunk + 4))
        # x'_j = a0 x_j + a1 x_{(j+1) mod 4} in the chunk: image 3 pairs with image 0, not 4.
        a0 = None
        for pos, j in enumerate(idx):
            partner = idx[(pos + 1) % 4]
            value = float(x[j, 0, 0, 0])
            w0 = (value - partner) / (j - partner)  # value = w0 * j + (1 - w0) * partner
            a0 = w0 if a0 is None else a0
            assert abs(w0 - a0) < 1e-4  # one weight vector per chunk (granularity device)
            expected = w0 * targets[j] + (1 - w0) * targets[partner]
            torch.testing.assert_close(y[j], expected, atol=1e-5, rtol=0)
        assert 0.5 <= a0 <= 1.0  # sorted descending: alpha_0 = max(l, 1 - l)


def test_mixup_weight_distribution_is_max_of_beta():
    # Beta(1, 1) is uniform and E[max(U, 1 - U)] = 3/4; sd of max is 1/sqrt(48) = 0.144.
    config = Mixup(concentration=1.0, granularity="example")
    images, targets = _batch(2000, classes=2000)
    x, _ = mixup(images, targets, config, torch.Generator().manual_seed(1))
    j = torch.arange(2000, dtype=torch.float32)
    partner = (j + 1) % 2000
    w0 = (x[:, 0, 0, 0] - partner) / (j - partner)
    assert torch.all(w0 >= 0.5 - 1e-3) and torch.all(w0 <= 1 + 1e-3)
    assert abs(float(w0.mean()) - 0.75) < 0.01  # 3.1 standard errors of 0.0032
    # Per-example weights differ between images.
    assert float(w0.std()) > 0.1


def test_mixup_granularity_batch_and_size_3_and_disabled():
    images, targets = _batch(6)
    x, y = mixup(images, targets, Mixup(concentration=0.5, granularity="batch", chunk_size=3),
                 torch.Generator().manual_seed(2))  # fmt: skip
    torch.testing.assert_close(y.sum(1), torch.ones(6))
    # One weight vector for both chunks: image 0 = a0*0 + a1*1, image 3 = a0*3 + a1*4.
    torch.testing.assert_close(x[3, 0, 0, 0] - x[0, 0, 0, 0], torch.tensor(3.0))
    x3, y3 = mixup(images, targets, Mixup(concentration=0.5, size=3),
                   torch.Generator().manual_seed(3))  # fmt: skip
    torch.testing.assert_close(y3.sum(1), torch.ones(6))
    assert int((y3[0] > 0).sum()) == 3  # image 0 mixes images 0, 1, 2
    same = mixup(images, targets, Mixup(), torch.Generator())
    assert same[0] is images and same[1] is targets
    again = mixup(images, targets, Mixup(concentration=0.5, size=3),
                  torch.Generator().manual_seed(3))  # fmt: skip
    torch.testing.assert_close(again[0], x3)  # deterministic for a seed


def test_mixup_bad_input():
    with pytest.raises(ValueError, match="concentration"):
        Mixup(concentration=-1)
    with pytest.raises(ValueError, match="granularity"):
        Mixup(granularity="host")
    images, targets = _batch(6)
    with pytest.raises(ValueError, match="chunk_size"):
        mixup(images, targets, Mixup(concentration=0.2, chunk_size=4), torch.Generator())


def test_soft_target_losses_match_float64_formulas():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 5))
    target = rng.dirichlet([0.5] * 5, size=4)
    # Softmax CE: mean_b -sum_c y log softmax(z); sigmoid: mean_b sum_c BCE(z, y).
    log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    softmax_ref = -(target * log_softmax).sum(1).mean()
    p = 1 / (1 + np.exp(-logits))
    sigmoid_ref = -(target * np.log(p) + (1 - target) * np.log(1 - p)).sum(1).mean()
    z, y = torch.tensor(logits, dtype=torch.float32), torch.tensor(target, dtype=torch.float32)
    assert abs(float(classification_loss(z, y, "softmax")) - softmax_ref) < 1e-5
    assert abs(float(classification_loss(z, y, "sigmoid")) - sigmoid_ref) < 1e-5
    # Hard labels still work and equal their one-hot soft form.
    hard = torch.tensor([0, 3, 1, 4])
    onehot = torch.nn.functional.one_hot(hard, 5).float()
    for kind in ("softmax", "sigmoid"):
        torch.testing.assert_close(
            classification_loss(z, hard, kind), classification_loss(z, onehot, kind)
        )
