import pytest
import torch

import visionmoe
from visionmoe.models import every_n, last_n, last_n_contiguous

DEBUG_MODELS = visionmoe.list_models("*_debug")


def test_registry_has_the_families():
    names = set(visionmoe.list_models())
    for required in [
        "vit_ti16",
        "vit_s16",
        "vit_b16",
        "vmoe_s32_e8_last2",
        "vmoe_b16_e8_every2",
        "ecmoe_s16_e32",
        "softmoe_s16_e128",
    ]:
        assert required in names
    assert {"vit_debug", "vmoe_debug", "ecmoe_debug", "softmoe_debug"} <= set(DEBUG_MODELS)


def test_placements():
    assert every_n(12, 2) == (1, 3, 5, 7, 9, 11)
    assert last_n(12, 2) == (9, 11)
    assert last_n(8, 2) == (5, 7)
    assert last_n(32, 5) == (23, 25, 27, 29, 31)
    assert last_n_contiguous(12, 6) == (6, 7, 8, 9, 10, 11)
    cfg = visionmoe.get_config("vmoe_s32_e8_last2")
    assert cfg.moe_layers == (5, 7) and cfg.num_layers == 8 and cfg.hidden_size == 512


@pytest.mark.parametrize("name", DEBUG_MODELS)
def test_debug_models_forward_backward_every_param_gets_grad(name):
    torch.manual_seed(0)
    model = visionmoe.create_model(name)
    torch.nn.init.normal_(model.head.weight, std=0.1)  # zero-init head would block gradients
    model.train()
    x = torch.randn(4, 3, 32, 32)
    logits, aux = model(x, return_aux=True)
    assert logits.shape == (4, 10)
    (logits.logsumexp(-1).mean() + aux.loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, f"parameters with all-zero gradients: {zero}"
    assert model.last_aux.loss.item() == aux.loss.item() and model.last_aux.loss.grad_fn is None


def test_aux_loss_is_sum_over_moe_layers():
    model = visionmoe.create_model("vmoe_debug").train()
    _, aux = model(torch.randn(4, 3, 32, 32), return_aux=True)
    assert set(aux.layers) == {1, 3}
    total = sum(a.loss for a in aux.layers.values())
    assert torch.allclose(aux.loss, total)
    assert aux.loss > 0
    assert "moe/layer1/dropped_frac" in aux.metrics()


def test_eval_is_deterministic():
    model = visionmoe.create_model("vmoe_debug").eval()
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(model(x), model(x))


def test_set_routing_changes_compute_spent():
    torch.manual_seed(0)
    model = visionmoe.create_model("vmoe_debug", group_images=4).eval()
    x = torch.randn(8, 3, 32, 32)

    def processed():
        _, aux = model(x, return_aux=True)
        return sum(a.metrics["tokens_processed"].item() for a in aux.layers.values())

    visionmoe.set_routing(model, capacity_factor=4.0)
    full = processed()
    # 8 images x 17 tokens, K=2, 2 MoE layers; nothing dropped at cf=4.
    assert full == 8 * 17 * 2 * 2
    visionmoe.set_routing(model, capacity_factor=0.5, batch_priority=True)
    half = processed()
    # cap per group of 68 tokens = ceil(68*2*0.5/4) = 17 -> 20 (multiple of 4); 4 experts x 20 x 2
    # groups x 2 layers = 320 slots at most.
    assert half <= 320 < full
    visionmoe.set_routing(model, capacity_factor=4.0, top_k=1)
    assert processed() == full / 2
    with pytest.raises(ValueError, match="top_k"):
        visionmoe.set_routing(model, top_k=5)


def test_set_routing_expert_choice():
    model = visionmoe.create_model("ecmoe_debug").eval()
    x = torch.randn(2, 3, 32, 32)

    def processed():
        _, aux = model(x, return_aux=True)
        return sum(a.metrics["tokens_processed"].item() for a in aux.layers.values())

    visionmoe.set_routing(model, capacity_factor=1.0)
    one = processed()
    visionmoe.set_routing(model, capacity_factor=0.5)
    assert processed() == pytest.approx(one / 2)


def test_pre_logits_and_headless_model():
    model = visionmoe.create_model("vit_debug", num_classes=0, representation_size=24)
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 24)
    model = visionmoe.create_model("vit_debug", classifier="map")
    feats = model.forward_features(x)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 32)


def test_sincos_posemb_and_ln_gelu_options():
    model = visionmoe.create_model("vit_debug", posemb="sincos2d", gelu="exact", ln_eps=1e-5)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert "pos_embed" not in dict(model.named_parameters())


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"top_k": 5}, "top_k=5"),
        ({"capacity_factor": 0.0}, "capacity_factor"),
        ({"capacity_factor": -2.0}, "-2.0"),
        ({"image_size": 30}, "image_size=30"),
        ({"group_size": 0}, "group_size"),
        ({"num_experts": 0}, "num_experts"),
        ({"moe_layers": (9,)}, "9"),
        ({"routr": "top_k"}, "router"),
    ],
)
def test_bad_config_values_are_named(overrides, fragment):
    with pytest.raises(ValueError, match=fragment):
        visionmoe.create_model("vmoe_debug", **overrides)


def test_unknown_model_lists_close_matches():
    with pytest.raises(ValueError, match="vmoe_debug"):
        visionmoe.create_model("vmoe_debg")


def test_bad_images_are_named():
    model = visionmoe.create_model("vit_debug")
    with pytest.raises(ValueError, match=r"\(2, 1, 32, 32\)"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\(3, 32, 32\)"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="64"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(TypeError, match="ndarray"):
        import numpy as np

        model(np.zeros((1, 3, 32, 32)))


def test_moe_options_on_dense_model_need_placement():
    with pytest.raises(ValueError, match="moe_layers"):
        visionmoe.create_model("vit_debug", num_experts=4)
    model = visionmoe.create_model("vit_debug", num_experts=4, top_k=1, moe_layers=[3])
    assert list(model.moe_blocks) == [3]


def test_config_round_trip():
    cfg = visionmoe.get_config("vmoe_debug")
    assert visionmoe.ViTConfig.from_dict(cfg.to_dict()) == cfg


def test_dense_twin_has_equal_active_flops():
    from torch.utils.flop_counter import FlopCounterMode

    from visionmoe.models import dense_twin

    cfg = visionmoe.get_config("vmoe_debug", capacity_factor=8.0, eval_capacity_factor=8.0)
    twin = dense_twin(cfg)
    assert twin.moe is None and twin.wide_mlp_layers == cfg.moe_layers
    x = torch.randn(2, 3, 32, 32)
    counts = []
    for config in (cfg, twin):
        model = visionmoe.VisionTransformer(config).eval()
        with FlopCounterMode(display=False) as counter:
            model(x)
        counts.append(counter.get_total_flops())
    # Equal up to the router (T x D x E per MoE block).
    router = 2 * (2 * 17) * 32 * 4 * 2
    assert counts[0] - counts[1] == router
