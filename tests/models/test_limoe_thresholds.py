"""LIMoE (spec section 4.2): each modality's global entropy loss uses its own threshold."""

import math

import pytest
import torch

from tests.models.tiny_limoe import tiny_limoe_config
from visionmoe.models.limoe import LIMoE, TextConfig


def test_each_modality_uses_its_own_entropy_threshold():
    # Loss = 1 * max(0, tau_image - Ent(p_image)) + 2 * max(0, tau_text - Ent(p_text)), where
    # p_m is modality m's mean router distribution (clean gates). Both taus exceed log(E), so both
    # terms are active and swapping the thresholds changes the loss by (2 - 1) * (tau gap).
    E = 4
    tau_image, tau_text = math.log(E) + 0.25, math.log(E) + 1.0
    text = TextConfig(
        vocab_size=64,
        max_len=8,
        embed_dim=8,
        image_local_weight=0.0,
        image_global_weight=1.0,
        text_local_weight=0.0,
        text_global_weight=2.0,
        tau_image=tau_image,
        tau_text=tau_text,
        keep_classic_losses=False,
    )
    config = tiny_limoe_config(num_experts=E, batch_priority=False)
    torch.manual_seed(0)
    model = LIMoE(config, text).eval()
    images, tokens = torch.randn(4, 1, 8, 8), torch.randint(1, 64, (4, 6))
    _, aux = model(images, tokens, return_aux=True)
    layer = aux.layers[1]
    gates, is_text = layer.moe.gates.double(), layer.is_text

    def marginal_entropy(mask):
        p = gates[mask].mean(0)
        return -(p * p.log()).sum().item()

    image_term = max(0.0, tau_image - marginal_entropy(~is_text))
    text_term = max(0.0, tau_text - marginal_entropy(is_text))
    assert image_term > 0 and text_term > 0
    assert layer.modality["image"]["global_entropy_loss"].item() == pytest.approx(image_term)
    assert layer.modality["text"]["global_entropy_loss"].item() == pytest.approx(text_term)
    assert aux.loss.item() == pytest.approx(image_term + 2 * text_term, rel=1e-6)
