"""Fine-tuning initialisation as vmoe does it: new head and position-embedding resize."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from visionmoe.layers.patch_embed import resize_pos_embed
from visionmoe.models import VisionTransformer, get_config
from visionmoe.train.finetune import load_init_weights


def _bilinear_align_corners(grid: np.ndarray, new: int) -> np.ndarray:
    """Resample an (n, n, D) grid to (new, new, D): output i samples input i * (n-1)/(new-1)."""
    old = grid.shape[0]

    def axis_weights(size_in: int, size_out: int) -> np.ndarray:  # (size_out, size_in)
        w = np.zeros((size_out, size_in))
        for i in range(size_out):
            pos = i * (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
            lo = min(int(np.floor(pos)), size_in - 1)
            hi = min(lo + 1, size_in - 1)
            w[i, lo] += 1 - (pos - lo)
            w[i, hi] += pos - lo
        return w

    rows = axis_weights(old, new)
    return np.einsum("ia,jb,abd->ijd", rows, rows, grid)


def test_tiny_grid_by_hand():
    # 2x2 grid with value 6r + 3c; aligned corners put output (i, j) of a 4x4 grid at input
    # (i/3, j/3), so it holds 6 * i/3 + 3 * j/3 = 2i + j. Half-pixel centres would instead sample
    # (i + 0.5)/2 - 0.5 = -0.25, 0.25, 0.75, 1.25 (clamped), giving rows 0, 1.5, 4.5, 6.
    grid = torch.tensor([[0.0, 3.0], [6.0, 9.0]]).reshape(1, 4, 1)
    cls = torch.tensor([[[-7.0]]])
    out = resize_pos_embed(torch.cat([cls, grid], 1), num_prefix=1, new_grid=4)
    expected = torch.tensor([[2.0 * i + j for j in range(4)] for i in range(4)])
    assert out[0, 0, 0] == -7.0  # class token kept
    torch.testing.assert_close(out[0, 1:, 0].reshape(4, 4), expected, rtol=0, atol=1e-6)


def _model(image_size: int, classes: int, seed: int) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(
        replace(get_config("vit_debug"), image_size=image_size, num_classes=classes)
    )


@pytest.mark.parametrize("src_size, dst_size", [(24, 40), (40, 24)])  # grids 3 -> 5 and 5 -> 3
def test_finetune_resizes_position_embedding_with_aligned_corners(src_size, dst_size):
    source = _model(src_size, 10, seed=0)
    with torch.no_grad():
        source.pos_embed.normal_()
    target = _model(dst_size, 10, seed=1)
    notes = load_init_weights(target, source.state_dict())
    assert any("position embedding resized" in n for n in notes)
    old, new = src_size // 8, dst_size // 8
    pos = source.pos_embed.detach().double().numpy()[0]
    expected = _bilinear_align_corners(pos[1:].reshape(old, old, -1), new).reshape(new * new, -1)
    got = target.pos_embed.detach().double().numpy()[0]
    np.testing.assert_array_equal(got[0], pos[0])  # class token kept
    np.testing.assert_allclose(got[1:], expected, rtol=0, atol=1e-6)


def test_new_head_has_zero_kernel_and_bias_minus_log_classes():
    source = _model(32, 10, seed=0)
    target = _model(32, 3, seed=1)
    with torch.no_grad():  # a head that is not at its fresh initialisation
        target.head.weight.normal_()
        target.head.bias.normal_()
    notes = load_init_weights(target, source.state_dict())
    assert any("new zero-initialised head (10 -> 3 classes" in n for n in notes)
    assert torch.all(target.head.weight == 0)
    # -ln 3 = -1.0986122886681098
    torch.testing.assert_close(target.head.bias, torch.full((3,), -1.0986122886681098))
    assert math.isclose(-math.log(3), -1.0986122886681098)
    torch.testing.assert_close(target.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
