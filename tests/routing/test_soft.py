import math
from dataclasses import replace

import ml_dtypes
import numpy as np
import pytest
import torch

from visionmoe.layers import SoftMoE
from visionmoe.models import MoEConfig, VisionTransformer, get_config
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


def _soft_reference(x, layer, group, bf16=False):
    """Float64 Soft MoE from the spec's formula; groups of ``group`` consecutive tokens."""
    p = {k: v.detach().double().numpy() for k, v in layer.state_dict().items()}
    mu = p["router.mu"] / np.sqrt((p["router.mu"] ** 2).sum(0, keepdims=True) + 1e-6)

    def gelu(h):  # tanh approximation
        return 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))

    def bf16_round(v):
        return v.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64) if bf16 else v

    x_td = x.reshape(-1, x.shape[-1])
    out = []
    for start in range(0, len(x_td), group):  # the last group may be smaller
        xs = x_td[start : start + group]
        logits = p["router.scale"] * np.einsum(
            "sd,dnp->snp", xs / np.sqrt((xs**2).sum(-1, keepdims=True) + 1e-6), mu
        )
        dispatch = np.exp(logits - logits.max(0)) / np.exp(logits - logits.max(0)).sum(0)
        flat = np.exp(logits - logits.max((1, 2), keepdims=True))
        combine = flat / flat.sum((1, 2), keepdims=True)
        slots = np.einsum("snp,sd->npd", dispatch, bf16_round(xs))
        h = gelu(np.einsum("npd,ndf->npf", slots, p["experts.w1"]) + p["experts.b1"][:, None])
        outs = bf16_round(np.einsum("npf,nfd->npd", h, p["experts.w2"]) + p["experts.b2"][:, None])
        out.append(np.einsum("snp,npd->sd", combine, outs))
    return np.concatenate(out).reshape(x.shape)


@pytest.mark.parametrize("bf16", [False, True])
def test_groups_span_images_and_a_last_partial_group(bf16):
    torch.manual_seed(0)
    layer = SoftMoE(8, 16, 4, 2, group_size=14, bf16_dispatch=bf16, expert_init="independent")
    with torch.no_grad():
        layer.router.scale.fill_(4.0)
    layer = layer.double()
    x = torch.randn(3, 7, 8, dtype=torch.float64)  # 21 tokens: a group of 2 images + 1 image
    with torch.no_grad():
        y, aux = layer(x)
    np.testing.assert_allclose(y.numpy(), _soft_reference(x.numpy(), layer, 14, bf16), atol=1e-12)
    assert aux.metrics["tokens_processed"].item() == 2 * 4 * 2  # 2 groups x 4 experts x 2 slots
    per_image = SoftMoE(8, 16, 4, 2, bf16_dispatch=bf16).double()  # default: one image per group
    per_image.load_state_dict(layer.state_dict())
    assert (per_image(x)[0] - y).abs().max() > 1e-2


def test_config_refuses_what_soft_moe_cannot_do():
    with pytest.raises(ValueError, match="bf16_dispatch needs router='soft'"):
        MoEConfig(router="top_k", bf16_dispatch=True)
    with pytest.raises(ValueError, match="bf16_dispatch must be True/False"):
        MoEConfig(router="soft", bf16_dispatch="yes")
    config = replace(get_config("softmoe_debug"), moe=MoEConfig(router="soft", group_images=None))
    with pytest.raises(ValueError, match="set moe.group_size"):
        VisionTransformer(config)
