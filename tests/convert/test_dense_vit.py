"""Dense ViT weights from timm, Hugging Face and big_vision load with the source's outputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from visionmoe.convert import detect_format, load_dense_vit

D, HEADS, MLP, LAYERS, PATCH, IMAGE, CLASSES = 16, 2, 24, 2, 4, 8, 5
TOKENS = (IMAGE // PATCH) ** 2 + 1


def _randn(gen, *shape, std=0.3):
    return torch.randn(*shape, generator=gen) * std


def timm_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {
        "cls_token": _randn(g, 1, 1, D),
        "pos_embed": _randn(g, 1, TOKENS, D),
        "patch_embed.proj.weight": _randn(g, D, 3, PATCH, PATCH),
        "patch_embed.proj.bias": _randn(g, D),
        "norm.weight": 1 + _randn(g, D, std=0.1),
        "norm.bias": _randn(g, D, std=0.1),
        "head.weight": _randn(g, CLASSES, D),
        "head.bias": _randn(g, CLASSES),
    }
    for i in range(LAYERS):
        b = f"blocks.{i}."
        sd.update(
            {
                b + "norm1.weight": 1 + _randn(g, D, std=0.1),
                b + "norm1.bias": _randn(g, D, std=0.1),
                b + "attn.qkv.weight": _randn(g, 3 * D, D),
                b + "attn.qkv.bias": _randn(g, 3 * D, std=0.1),
                b + "attn.proj.weight": _randn(g, D, D),
                b + "attn.proj.bias": _randn(g, D, std=0.1),
                b + "norm2.weight": 1 + _randn(g, D, std=0.1),
                b + "norm2.bias": _randn(g, D, std=0.1),
                b + "mlp.fc1.weight": _randn(g, MLP, D),
                b + "mlp.fc1.bias": _randn(g, MLP, std=0.1),
                b + "mlp.fc2.weight": _randn(g, D, MLP),
                b + "mlp.fc2.bias": _randn(g, D, std=0.1),
            }
        )
    return sd


def timm_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights under Hugging Face ``ViTForImageClassification`` names."""
    hf = {
        "vit.embeddings.cls_token": sd["cls_token"],
        "vit.embeddings.position_embeddings": sd["pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "vit.layernorm.weight": sd["norm.weight"],
        "vit.layernorm.bias": sd["norm.bias"],
        "classifier.weight": sd["head.weight"],
        "classifier.bias": sd["head.bias"],
    }
    for i in range(LAYERS):
        t, h = f"blocks.{i}.", f"vit.encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = sd[t + f"attn.qkv.{kind}"].chunk(3)
            hf[h + f"attention.attention.query.{kind}"] = q
            hf[h + f"attention.attention.key.{kind}"] = k
            hf[h + f"attention.attention.value.{kind}"] = v
            hf[h + f"attention.output.dense.{kind}"] = sd[t + f"attn.proj.{kind}"]
            hf[h + f"layernorm_before.{kind}"] = sd[t + f"norm1.{kind}"]
            hf[h + f"layernorm_after.{kind}"] = sd[t + f"norm2.{kind}"]
            hf[h + f"intermediate.dense.{kind}"] = sd[t + f"mlp.fc1.{kind}"]
            hf[h + f"output.dense.{kind}"] = sd[t + f"mlp.fc2.{kind}"]
    return hf


def torch_vit_reference(sd, images, eps, split_qkv=False):
    """A PyTorch-convention pre-LN ViT written out op by op in float64 (exact GELU)."""
    p = {k: v.double() for k, v in sd.items()}
    x = F.conv2d(images.double(), p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([p["cls_token"].expand(len(x), -1, -1), x], 1) + p["pos_embed"]
    b, n, _ = x.shape
    dh = D // HEADS

    def ln(t, name):
        return F.layer_norm(t, (D,), p[name + ".weight"], p[name + ".bias"], eps)

    for i in range(LAYERS):
        pre = f"blocks.{i}."
        y = ln(x, pre + "norm1")
        if split_qkv:  # q, k, v as three separate projections (Hugging Face style)
            w, bias = p[pre + "attn.qkv.weight"].chunk(3), p[pre + "attn.qkv.bias"].chunk(3)
            q, k, v = (y @ w[j].T + bias[j] for j in range(3))
        else:
            q, k, v = (y @ p[pre + "attn.qkv.weight"].T + p[pre + "attn.qkv.bias"]).split(D, -1)
        q, k, v = (t.view(b, n, HEADS, dh).transpose(1, 2) for t in (q, k, v))
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1)
        o = (attn @ v).transpose(1, 2).reshape(b, n, D)
        x = x + o @ p[pre + "attn.proj.weight"].T + p[pre + "attn.proj.bias"]
        y = ln(x, pre + "norm2")
        hidden = F.gelu(y @ p[pre + "mlp.fc1.weight"].T + p[pre + "mlp.fc1.bias"])
        x = x + hidden @ p[pre + "mlp.fc2.weight"].T + p[pre + "mlp.fc2.bias"]
    x = ln(x, "norm")
    return x[:, 0] @ p["head.weight"].T + p["head.bias"]


def _images(seed=0, n=4):
    return torch.rand(n, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_timm_weights_match_reference():
    sd = timm_state(0)
    model, report = load_dense_vit(sd, num_heads=HEADS)
    assert report.ok and detect_format(list(sd)) == "timm"
    cfg = model.config
    assert (cfg.ln_eps, cfg.gelu, cfg.num_layers, cfg.mlp_dim, cfg.image_size) == (
        1e-6, "exact", LAYERS, MLP, IMAGE,
    )  # fmt: skip
    images = _images()
    with torch.no_grad():
        torch.testing.assert_close(
            model(images).double(), torch_vit_reference(sd, images, 1e-6), atol=1e-5, rtol=0
        )


def test_hf_weights_match_reference():
    sd = timm_state(1)
    hf = timm_to_hf(sd)
    model, report = load_dense_vit(hf, num_heads=HEADS)
    assert report.ok and model.config.ln_eps == 1e-12
    assert report.mapped["blocks.0.attn.qkv.bias"][0].endswith("query.bias")
    images = _images(1)
    with torch.no_grad():
        expected = torch_vit_reference(sd, images, 1e-12, split_qkv=True)
        torch.testing.assert_close(model(images).double(), expected, atol=1e-5, rtol=0)


def _to_big_vision(tree: dict, vit_jax_names: bool) -> dict[str, np.ndarray]:
    """Flatten a dense vmoe-layout tree into big_vision (or older vit_jax) npz names."""
    attn, mlp, ln2 = ("MultiHeadDotProductAttention_1", "MlpBlock_3", "LayerNorm_2")
    if not vit_jax_names:
        attn, mlp, ln2 = ("MultiHeadDotProductAttention_0", "MlpBlock_0", "LayerNorm_1")
    out = {}

    def put(prefix, node):
        for key, value in node.items():
            if isinstance(value, dict):
                put(f"{prefix}{key}/", value)
            else:
                out[f"{prefix}{key}"] = value

    enc = tree["Encoder"]
    for i in range(LAYERS):
        blk = enc[f"encoderblock_{i}"]
        b = f"params/Transformer/encoderblock_{i}/"
        put(b + "LayerNorm_0/", blk["LayerNorm_0"])
        put(b + ln2 + "/", blk["LayerNorm_1"])
        put(b + attn + "/", blk["SelfAttention"])
        put(b + mlp + "/", blk["Mlp"])
    put("params/Transformer/encoder_norm/", enc["encoder_norm"])
    put("params/", {k: tree[k] for k in ("embedding", "cls", "head")})
    pos = enc["posembed_input"]["pos_embedding"]
    if vit_jax_names:
        out["params/Transformer/posembed_input/pos_embedding"] = pos
    else:
        out["params/pos_embedding"] = pos[:, 1:]  # big_vision: patches only
    out["opt/state/mu"] = np.zeros(3, np.float32)
    return out


@pytest.mark.parametrize("vit_jax_names", [False, True])
def test_big_vision_npz_matches_reference(tmp_path, vmoe_tree, flax_reference, vit_jax_names):
    tree = vmoe_tree(
        seed=3, width=D, heads=HEADS, mlp=MLP, layers=LAYERS, moe_layers=(), representation=None
    )
    flat = _to_big_vision(tree, vit_jax_names)
    np.savez(tmp_path / "bv.npz", **flat)
    model, report = load_dense_vit(tmp_path / "bv.npz")
    assert report.unmapped == ["opt/state/mu"] and not report.missing
    assert model.config.num_heads == HEADS and model.config.gelu == "tanh"
    reference_tree = tree
    if not vit_jax_names:
        pos = tree["Encoder"]["posembed_input"]["pos_embedding"][:, 1:]
        reference_tree = {
            **tree,
            "Encoder": {**tree["Encoder"], "posembed_input": {"pos_embedding": pos}},
        }
        assert any("class token" in n for n in report.notes)
    images = _images(3)
    expected = flax_reference(reference_tree, images.numpy(), posemb_excludes_cls=not vit_jax_names)
    with torch.no_grad():
        np.testing.assert_allclose(model(images).double().numpy(), expected, atol=1e-5, rtol=0)


def test_big_vision_scanned_blocks(vmoe_tree):
    tree = vmoe_tree(seed=4, width=D, heads=HEADS, mlp=MLP, layers=LAYERS, moe_layers=())
    flat = _to_big_vision(tree, vit_jax_names=False)
    per_block = [f"params/Transformer/encoderblock_{i}/" for i in range(LAYERS)]
    scanned = {
        k: v for k, v in flat.items() if not k.startswith("params/Transformer/encoderblock_")
    }
    for rest in [k[len(per_block[0]) :] for k in flat if k.startswith(per_block[0])]:
        scanned["params/Transformer/encoderblock/" + rest] = np.stack(
            [flat[b + rest] for b in per_block]
        )
    images = _images(4)
    a, _ = load_dense_vit(flat)
    b, _ = load_dense_vit(scanned)
    torch.testing.assert_close(a(images), b(images), rtol=0, atol=0)


def test_missing_and_unexpected_keys_are_reported():
    sd = timm_state(5)
    del sd["blocks.1.norm2.weight"]
    sd["blocks.0.ls1.gamma"] = torch.ones(D)
    with pytest.raises(ValueError, match="1 parameters missing"):
        load_dense_vit(sd, num_heads=HEADS)
    model, report = load_dense_vit(sd, num_heads=HEADS, strict=False)
    assert report.missing == ["blocks.1.norm2.weight"]
    assert report.unmapped == ["blocks.0.ls1.gamma"]
    assert "missing parameters (1)" in report.summary()


def test_files_and_format_guesses(tmp_path):
    sd = timm_state(6)
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": sd}, tmp_path / "w.pt")
    images = _images(6)
    a, _ = load_dense_vit(tmp_path / "w.safetensors", num_heads=HEADS)
    b, _ = load_dense_vit(tmp_path / "w.pt", "timm", num_heads=HEADS)
    torch.testing.assert_close(a(images), b(images), rtol=0, atol=0)
    _, report = load_dense_vit(sd)  # heads not stored in timm weights: guessed and noted
    assert any("num_heads" in n for n in report.notes)
    with pytest.raises(ValueError, match="cannot tell the format"):
        load_dense_vit({"foo": torch.zeros(1)})
    with pytest.raises(ValueError, match="format must be one of"):
        load_dense_vit(sd, format="keras")


def test_timm_without_qkv_bias_and_new_head():
    sd = {k: v for k, v in timm_state(7).items() if not k.endswith("qkv.bias")}
    model, report = load_dense_vit(sd, num_heads=HEADS, num_classes=3)
    assert torch.all(model.blocks[0].attn.qkv.bias == 0)
    assert model.head.weight.shape == (3, D) and any("new zero" in n for n in report.notes)
