"""Converted vmoe Soft MoE models: groups spanning images and bfloat16 dispatch, vs float64."""

from __future__ import annotations

import numpy as np
import torch

from visionmoe.convert import load_vmoe

TOKENS = 5  # (8 / 4)^2 patches + the class token


def _setup(vmoe_tree):
    tree = vmoe_tree(seed=3, soft_slots=2, moe_layers=(0, 1), representation=None)
    images = np.random.default_rng(4).uniform(-1, 1, (4, 3, 8, 8)).astype(np.float32)
    return tree, images


def _logits(model, images, dtype=torch.float32):
    with torch.no_grad():
        return model.to(dtype)(torch.from_numpy(images).to(dtype)).double().numpy()


def test_soft_moe_groups_of_two_images_match_the_reference(vmoe_tree, flax_reference):
    tree, images = _setup(vmoe_tree)
    model = load_vmoe(tree, group_size=2 * TOKENS, bf16_dispatch=False)
    assert model.blocks[0].ffn.group_size == 2 * TOKENS
    expected = flax_reference(tree, images, soft_group_tokens=2 * TOKENS)
    np.testing.assert_allclose(_logits(model, images), expected, rtol=0, atol=2e-5)
    # The grouping matters: one image per group gives clearly different logits.
    per_image = flax_reference(tree, images, soft_group_tokens=TOKENS)
    assert np.abs(per_image - expected).max() > 1e-2


def test_bf16_dispatch_matches_the_rounding_reference(vmoe_tree, flax_reference):
    tree, images = _setup(vmoe_tree)
    model = load_vmoe(tree, group_size=2 * TOKENS)  # converted Soft MoE: bf16 dispatch on
    assert model.config.moe.bf16_dispatch
    expected = flax_reference(tree, images, soft_group_tokens=2 * TOKENS, soft_bf16=True)
    got = _logits(model, images, torch.float64)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    # Rounding to bfloat16 (8 significant bits, relative step 2^-8 ~ 4e-3) moves the logits by
    # the order of 1e-3 against float32-or-better dispatch.
    exact = flax_reference(tree, images, soft_group_tokens=2 * TOKENS)
    change = np.abs(expected - exact).max()
    assert 2e-4 < change < 5e-3, change  # measured 1.0e-3 here
