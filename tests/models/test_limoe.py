"""LIMoE: shapes, pad handling, mixed-modality routing groups, losses and gradients."""

import math
from dataclasses import replace

import pytest
import torch

from tests.models.tiny_limoe import tiny_limoe_config
from visionmoe.data import text as text_data
from visionmoe.models.limoe import PAD_ID, LIMoE, TextConfig
from visionmoe.models.limoe_aux import contrastive_loss
from visionmoe.routing.entropy import global_entropy_loss, local_entropy_loss

B, LI, LT = 4, 16, 6  # 4 pairs, 16 patches per 8x8 image (patch 2), texts of 6 positions


def _model(text: TextConfig | None = None, **moe) -> LIMoE:
    torch.manual_seed(0)
    text = text or TextConfig(vocab_size=64, max_len=8, embed_dim=8)
    return LIMoE(tiny_limoe_config(**moe), text)


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(B, 1, 8, 8, generator=g)
    tokens = torch.randint(3, 64, (B, LT), generator=g)
    tokens[0, 2:] = PAD_ID  # 2 real tokens
    tokens[1, 4:] = PAD_ID  # 4 real tokens; rows 2 and 3 are full
    return images, tokens


def test_shapes_and_normalised_embeddings():
    model = _model().eval()
    images, tokens = _inputs()
    logits, aux = model(images, tokens, return_aux=True)
    assert logits.shape == (B, B) and model.last_aux.loss.item() == aux.loss.item()
    u, v = model.encode_image(images), model.encode_text(tokens)
    assert u.shape == (B, 8) and v.shape == (B, 8)
    assert torch.allclose(u.norm(dim=-1), torch.ones(B), atol=1e-5)
    assert torch.allclose(v.norm(dim=-1), torch.ones(B), atol=1e-5)
    # 1 / temperature_init = 10 (TextConfig default 0.1).
    assert model.logit_scale.item() == pytest.approx(10.0, rel=1e-5)
    assert model.forward_head(model.forward_features(images), pre_logits=True).shape == (B, 16)


def test_pads_change_nothing():
    model = _model(capacity_factor=8.0).eval()  # eval: no router noise; nothing dropped
    images, tokens = _inputs()
    padded = torch.cat([tokens, torch.zeros(B, 2, dtype=torch.long)], dim=1)
    assert torch.allclose(model.encode_text(tokens), model.encode_text(padded), atol=1e-6)
    assert torch.allclose(model(images, tokens), model(images, padded), atol=1e-5)
    # A text alone equals itself inside a batch of longer texts (its pads never attended to).
    alone = model.encode_text(tokens[:1, :2])
    assert torch.allclose(alone, model.encode_text(tokens)[:1], atol=1e-6)


def test_mixed_routing_group_holds_both_modalities():
    model = _model().train()
    images, tokens = _inputs()
    _, aux = model(images, tokens, return_aux=True)
    layer = aux.layers[1]
    real = int((tokens != PAD_ID).sum())
    assert real == 2 + 4 + 6 + 6
    assert layer.moe.plan.num_tokens == B * LI + real  # image tokens + non-pad text tokens
    assert layer.moe.gates.shape == (B * LI + real, 4)
    assert int(layer.is_text.sum()) == real and int((~layer.is_text).sum()) == B * LI
    # group_images=2: two groups of two pairs, each images then texts -> 3 modality switches.
    _, aux2 = _model(group_images=2)(images, tokens, return_aux=True)
    switches = (aux2.layers[1].is_text[1:] != aux2.layers[1].is_text[:-1]).sum()
    assert int(switches) == 3 and aux2.layers[1].moe.plan.num_tokens == B * LI + real


def test_per_modality_metrics_present():
    model = _model().train()
    _, aux = model(*_inputs(), return_aux=True)
    metrics = aux.metrics()
    for modality in ("image", "text"):
        for name in ("load_cv2", "dropped_frac", "router_entropy", "marginal_entropy"):
            assert f"moe/layer1/{modality}/{name}" in metrics
        assert aux.layers[1].modality[modality]["load"].shape == (4,)
    assert metrics["moe/layer1/text/num_tokens"] == 18.0
    assert "moe/layer1/load_cv2" in metrics  # the mixed pool as well


def test_layer_loss_is_weighted_entropy_terms():
    text = TextConfig(
        vocab_size=64,
        max_len=8,
        embed_dim=8,
        image_local_weight=0.1,
        image_global_weight=0.2,
        text_local_weight=0.3,
        text_global_weight=0.4,
        tau_text=math.log(8),
        keep_classic_losses=False,
    )
    model = _model(text).train()
    _, aux = model(*_inputs(), return_aux=True)
    layer = aux.layers[1]
    gates, is_text = layer.moe.gates, layer.is_text
    expected = (
        0.1 * local_entropy_loss(gates, ~is_text)
        + 0.2 * global_entropy_loss(gates, ~is_text, None)
        + 0.3 * local_entropy_loss(gates, is_text)
        + 0.4 * global_entropy_loss(gates, is_text, math.log(8))
    )
    assert torch.allclose(aux.loss, expected, atol=1e-6)
    # Keeping the classic losses adds the router's importance/load loss of the mixed pool.
    model = _model(replace(text, keep_classic_losses=True)).train()
    torch.manual_seed(3)
    _, aux = model(*_inputs(), return_aux=True)
    layer = aux.layers[1]
    assert layer.moe.loss > 0
    gates, is_text = layer.moe.gates, layer.is_text
    entropy_part = (
        0.1 * local_entropy_loss(gates, ~is_text)
        + 0.2 * global_entropy_loss(gates, ~is_text, None)
        + 0.3 * local_entropy_loss(gates, is_text)
        + 0.4 * global_entropy_loss(gates, is_text, math.log(8))
    )
    assert torch.allclose(aux.loss, entropy_part + layer.moe.loss, atol=1e-6)


def test_every_parameter_gets_a_gradient():
    model = _model().train()
    images, tokens = _inputs()
    logits, aux = model(images, tokens, return_aux=True)
    (contrastive_loss(logits) + aux.loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, f"parameters with all-zero gradients: {zero}"


def test_contrastive_loss_golden():
    # Z = I: each row CE = -log(e / (e + 1)) = log(1 + e^-1) = 0.3132617; symmetric -> same.
    assert contrastive_loss(torch.eye(2)).item() == pytest.approx(0.3132617, abs=1e-6)
    with pytest.raises(ValueError, match="square"):
        contrastive_loss(torch.zeros(2, 3))


def test_bad_inputs_and_configs():
    model = _model()
    images, tokens = _inputs()
    with pytest.raises(ValueError, match="encode_image"):
        model(images)
    empty = tokens.clone()
    empty[2] = PAD_ID
    with pytest.raises(ValueError, match="non-pad"):
        model.encode_text(empty)
    with pytest.raises(ValueError, match="max_len"):
        model.encode_text(torch.ones(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size"):
        model.encode_text(torch.full((1, 2), 64))
    with pytest.raises(ValueError, match="group_size"):
        _model(group_size=32)
    with pytest.raises(ValueError, match="sparse router"):
        _model(router="soft")
    for bad in ({"temperature_init": 0.0}, {"tau_text": -1.0}, {"max_len": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TextConfig(**bad)
    assert PAD_ID == text_data.PAD_ID


@pytest.mark.parametrize("group_images", [None, 2])
def test_separate_modality_capacity_routes_each_modality_alone(group_images):
    text = TextConfig(vocab_size=64, max_len=8, embed_dim=8, separate_modality_capacity=True)
    images, tokens = _inputs()
    # capacity_factor 0.5 drops tokens, so a shared pool lets one modality take the other's slots.
    separate = _model(text, capacity_factor=0.5, group_images=group_images).eval()
    mixed = _model(capacity_factor=0.5, group_images=group_images).eval()
    for model, alone in ((separate, True), (mixed, False)):
        with torch.no_grad():
            joint = model(images, tokens)
            u, v = model.encode_image(images), model.encode_text(tokens)
            if group_images is not None:  # encode_* routes the whole batch as one group
                u = torch.cat([model.encode_image(images[i : i + 2]) for i in (0, 2)])
                v = torch.cat([model.encode_text(tokens[i : i + 2]) for i in (0, 2)])
        assert torch.allclose(joint, model.logit_scale * u @ v.T, atol=1e-5) == alone
    layer = separate(images, tokens, return_aux=True)[1].layers[1]
    assert set(layer.modality) == {"image", "text"}


def test_separate_modality_capacity_must_be_bool():
    with pytest.raises(ValueError, match="separate_modality_capacity"):
        TextConfig(separate_modality_capacity="yes")
