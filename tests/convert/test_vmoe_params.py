"""vmoe parameter trees -> our model: released shapes, numerical parity, presets, reports."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from visionmoe.convert import (
    VMOE_PRESETS,
    convert_vmoe_cli,
    convert_vmoe_tree,
    get_preset,
    infer_vmoe_config,
    load_vmoe,
    write_vmoe_checkpoint,
)
from visionmoe.convert.vmoe_params import flatten_tree, vmoe_model_config
from visionmoe.hub import from_pretrained
from visionmoe.models.vit import VisionTransformer


def _zeros(*shape):
    """A zero-filled array of any size that costs no memory (all strides 0)."""
    return np.lib.stride_tricks.as_strided(
        np.zeros(1, np.float32), shape, (0,) * len(shape), writeable=False
    )


def released_tree(
    layers, d, mlp, heads, experts, moe_layers, patch, image, classes, rep, members=1
):
    """A zero tree in exactly the shapes CHECKPOINT_FORMAT.md lists for the released models."""
    tokens = (image // patch) ** 2 + 1
    flat = {
        "embedding/kernel": _zeros(patch, patch, 3, d),
        "embedding/bias": _zeros(d),
        "cls": _zeros(1, 1, d),
        "Encoder/posembed_input/pos_embedding": _zeros(1, tokens, d),
        "Encoder/encoder_norm/scale": _zeros(d),
        "Encoder/encoder_norm/bias": _zeros(d),
        "head/kernel": _zeros(rep or d, classes),
        "head/bias": _zeros(classes),
    }
    if rep:
        flat.update({"pre_logits/kernel": _zeros(d, rep), "pre_logits/bias": _zeros(rep)})
    for i in range(layers):
        b = f"Encoder/encoderblock_{i}/"
        for ln in ("LayerNorm_0", "LayerNorm_1"):
            flat.update({f"{b}{ln}/scale": _zeros(d), f"{b}{ln}/bias": _zeros(d)})
        for name in ("query", "key", "value"):
            flat[f"{b}SelfAttention/{name}/kernel"] = _zeros(d, heads, d // heads)
            flat[f"{b}SelfAttention/{name}/bias"] = _zeros(heads, d // heads)
        flat[f"{b}SelfAttention/out/kernel"] = _zeros(heads, d // heads, d)
        flat[f"{b}SelfAttention/out/bias"] = _zeros(d)
        if i in moe_layers:
            e = experts
            flat.update(
                {
                    f"{b}Moe/Mlp/Dense_0/kernel": _zeros(e, d, mlp),
                    f"{b}Moe/Mlp/Dense_0/bias": _zeros(e, mlp),
                    f"{b}Moe/Mlp/Dense_1/kernel": _zeros(e, mlp, d),
                    f"{b}Moe/Mlp/Dense_1/bias": _zeros(e, d),
                    f"{b}Moe/Router/dense/kernel": (
                        _zeros(d, e) if members == 1 else _zeros(d, members, e // members)
                    ),
                }
            )
        else:
            flat.update(
                {
                    f"{b}Mlp/Dense_0/kernel": _zeros(d, mlp),
                    f"{b}Mlp/Dense_0/bias": _zeros(mlp),
                    f"{b}Mlp/Dense_1/kernel": _zeros(mlp, d),
                    f"{b}Mlp/Dense_1/bias": _zeros(d),
                }
            )
    return flat


RELEASED = {
    "vmoe_s32_last2_ilsvrc2012": dict(
        layers=8, d=512, mlp=2048, heads=8, experts=8, moe_layers=(5, 7), patch=32, image=224,
        classes=1000, rep=512,
    ),
    "vmoe_b16_imagenet21k": dict(
        layers=12, d=768, mlp=3072, heads=12, experts=8, moe_layers=(1, 3, 5, 7, 9, 11),
        patch=16, image=224, classes=21843, rep=None,
    ),
    "eee_s32_last2_ilsvrc2012": dict(
        layers=8, d=512, mlp=2048, heads=8, experts=8, moe_layers=(5, 7), patch=32, image=224,
        classes=1000, rep=512, members=2,
    ),
}  # fmt: skip


@pytest.mark.parametrize("preset", list(RELEASED))
def test_released_shapes_map_one_to_one(preset):
    flat = released_tree(**RELEASED[preset])
    flat["Encoder/encoderblock_0/Unknown/kernel"] = _zeros(3)
    config = vmoe_model_config(infer_vmoe_config(flat), dict(get_preset(preset).overrides), {})
    with torch.device("meta"):
        expected = {k: v.shape for k, v in VisionTransformer(config).state_dict().items()}
    state, report = convert_vmoe_tree(flat)
    assert report.unmapped == ["Encoder/encoderblock_0/Unknown/kernel"]
    used = [name for names in report.mapped.values() for name in names]
    assert sorted(used) == sorted(set(flat) - set(report.unmapped))  # each leaf used once
    assert set(state) == set(expected)
    for key, shape in expected.items():
        assert state[key].shape == shape, key
    spec = RELEASED[preset]
    tokens = (spec["image"] // spec["patch"]) ** 2 + 1
    assert expected["pos_embed"] == (1, tokens, spec["d"])
    assert config.moe_layers == spec["moe_layers"] and config.num_heads == spec["heads"]


def test_presets_carry_the_released_routing():
    flat = released_tree(**RELEASED["vmoe_s32_last2_ilsvrc2012"])
    config = vmoe_model_config(
        infer_vmoe_config(flat), dict(VMOE_PRESETS["vmoe_s32_last2_ilsvrc2012"].overrides), {}
    )
    moe = config.moe
    assert (moe.top_k, moe.capacity_factor, moe.eval_capacity_factor) == (2, 1.05, 4.0)
    assert (moe.group_images, moe.capacity_rounding, moe.capacity_multiple_of) == (8, "ceil", 4)
    assert (config.ln_eps, config.gelu, config.classifier) == (1e-6, "tanh", "token")
    assert config.representation_size == 512 and config.num_classes == 1000
    eee = vmoe_model_config(
        infer_vmoe_config(released_tree(**RELEASED["eee_s32_last2_ilsvrc2012"])),
        dict(get_preset("eee_s32_last2_ilsvrc2012").overrides),
        {},
    )
    assert eee.moe.ensemble_members == 2 and eee.moe.top_k == 1
    assert (
        get_preset("vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012").overrides["image_size"]
        == 384
    )
    with pytest.raises(ValueError, match="unknown vmoe preset"):
        get_preset("vmoe_s99")


@pytest.mark.parametrize("capacity_factor", [0.5, 1.05])
def test_output_matches_an_independent_reference(vmoe_tree, flax_reference, capacity_factor):
    tree = vmoe_tree(seed=1)
    model = load_vmoe(tree, capacity_factor=capacity_factor)
    assert model.config.num_heads == 2 and model.config.moe_layers == (1,)
    images = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    stats: dict = {}
    expected = flax_reference(
        tree, images.numpy(), capacity_factor=capacity_factor, group_images=8, stats=stats
    )
    if capacity_factor < 1:
        assert stats[1] > 0, "the test should exercise dropping"
    with torch.no_grad():
        got = model(images).double().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_loading_files_equals_loading_the_tree(tmp_path, vmoe_tree):
    tree = vmoe_tree(seed=2)
    write_vmoe_checkpoint(tmp_path / "ckpt", tree, num_shards=2, max_chunk_bytes=256)
    from_files = load_vmoe(tmp_path / "ckpt").state_dict()
    from_tree = load_vmoe(tree).state_dict()
    for key, value in from_tree.items():
        torch.testing.assert_close(from_files[key], value, rtol=0, atol=0)


def test_unmapped_leaves_warn_and_are_reported(vmoe_tree):
    tree = vmoe_tree(seed=3)
    tree["MAPHead_0"] = {"probe": np.zeros((1, 1, 16), np.float32)}
    with pytest.warns(UserWarning, match="MAPHead_0/probe"):
        _, report = load_vmoe(tree, return_report=True)
    assert report.unmapped == ["MAPHead_0/probe"] and not report.missing
    assert report.mapped["blocks.0.attn.qkv.weight"] == [
        f"Encoder/encoderblock_0/SelfAttention/{n}/kernel" for n in ("query", "key", "value")
    ]


def test_missing_parameters_raise(vmoe_tree):
    tree = vmoe_tree(seed=3)
    del tree["Encoder"]["encoderblock_0"]["LayerNorm_1"]
    with pytest.raises(ValueError, match="2 parameters missing"):
        load_vmoe(tree)


def test_preset_mismatch_is_refused(vmoe_tree):
    with pytest.raises(ValueError, match="does not match the preset"):
        load_vmoe(vmoe_tree(seed=4), "vmoe_s32_last2_ilsvrc2012")


def test_finetune_overrides_resize_posemb_and_replace_head(vmoe_tree):
    model, report = load_vmoe(vmoe_tree(seed=5), image_size=16, num_classes=3, return_report=True)
    assert model.pos_embed.shape == (1, 17, 16)
    assert torch.all(model.head.weight == 0)
    assert any("resized" in n for n in report.notes) and any("new zero" in n for n in report.notes)
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 3)


def test_e3_router_layout(vmoe_tree):
    tree = vmoe_tree(seed=6, members=2)
    kernel = tree["Encoder"]["encoderblock_1"]["Moe"]["Router"]["dense"]["kernel"]  # (D, 2, 2)
    model = load_vmoe(tree, top_k=1)
    assert model.config.moe.ensemble_members == 2
    weight = model.blocks[1].ffn.router.proj.weight  # member m owns rows [2m, 2m + 2)
    for m in range(2):
        np.testing.assert_array_equal(weight[2 * m : 2 * m + 2].detach().numpy(), kernel[:, m].T)
    assert model(torch.zeros(3, 3, 8, 8)).shape == (3, 2, 5)
    # One member is a plain V-MoE router.
    plain = vmoe_tree(seed=7)
    single = vmoe_tree(seed=7)
    router = single["Encoder"]["encoderblock_1"]["Moe"]["Router"]["dense"]
    router["kernel"] = router["kernel"][:, None, :]
    images = torch.rand(8, 3, 8, 8)
    torch.testing.assert_close(load_vmoe(single)(images), load_vmoe(plain)(images))


def test_convert_cli_writes_a_pretrained_folder(tmp_path, vmoe_tree):
    tree = vmoe_tree(seed=8)
    write_vmoe_checkpoint(tmp_path / "src", tree)
    out = convert_vmoe_cli(tmp_path / "src", tmp_path / "out", None, {"eval_capacity_factor": 4.0})
    model = from_pretrained(out)
    assert model.config.moe.eval_capacity_factor == 4.0
    images = torch.rand(8, 3, 8, 8)
    reference = load_vmoe(tree, eval_capacity_factor=4.0)
    torch.testing.assert_close(model(images), reference(images))
    record = json.loads((out / "conversion.json").read_text())
    assert record["report"]["unmapped"] == [] and record["format"] == "vmoe"


def test_flatten_tree():
    assert flatten_tree({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a/b": 1, "a/c/d": 2, "e": 3}
