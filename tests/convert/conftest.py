"""Shared fixtures: random Flax-layout (vmoe / big_vision) ViT trees and an independent forward.

The reference forward is written from the vmoe conventions (spec CHECKPOINT_FORMAT.md) directly
on the Flax-layout tensors, in float64 numpy, sharing no code with the converter or our model.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every conversion test runs on one thread (see tests/conftest.py)."""


def random_vmoe_tree(
    seed: int = 0,
    width: int = 16,
    heads: int = 2,
    mlp: int = 32,
    layers: int = 2,
    moe_layers: tuple[int, ...] = (1,),
    experts: int = 4,
    patch: int = 4,
    image: int = 8,
    classes: int = 5,
    representation: int | None = 8,
    in_chans: int = 3,
    members: int = 1,
    soft_slots: int | None = None,
) -> dict:
    """A random nested vmoe parameter tree in float32 (token classifier, learned posemb).

    ``soft_slots`` gives the MoE blocks a Soft MoE router (``mu (D, E, slots)``, ``scale ()``).
    """
    rng = np.random.default_rng(seed)

    def normal(*shape, std=0.3):
        return (std * rng.standard_normal(shape)).astype(np.float32)

    d, dh = width, width // heads
    tokens = (image // patch) ** 2 + 1
    encoder: dict = {
        "posembed_input": {"pos_embedding": normal(1, tokens, d, std=0.5)},
        "encoder_norm": {"scale": 1 + normal(d, std=0.1), "bias": normal(d, std=0.1)},
    }
    for i in range(layers):
        block = {
            "LayerNorm_0": {"scale": 1 + normal(d, std=0.1), "bias": normal(d, std=0.1)},
            "LayerNorm_1": {"scale": 1 + normal(d, std=0.1), "bias": normal(d, std=0.1)},
            "SelfAttention": {
                **{
                    name: {"kernel": normal(d, heads, dh), "bias": normal(heads, dh, std=0.1)}
                    for name in ("query", "key", "value")
                },
                "out": {"kernel": normal(heads, dh, d), "bias": normal(d, std=0.1)},
            },
        }
        if i in moe_layers:
            e = experts
            router = normal(d, e, std=1.0)
            if members > 1:
                router = router.reshape(d, members, e // members)
            block["Moe"] = {
                "Mlp": {
                    "Dense_0": {"kernel": normal(e, d, mlp), "bias": normal(e, mlp, std=0.1)},
                    "Dense_1": {"kernel": normal(e, mlp, d), "bias": normal(e, d, std=0.1)},
                },
                "Router": {"dense": {"kernel": router}},
            }
            if soft_slots is not None:
                block["Moe"]["Router"] = {
                    "mu": normal(d, e, soft_slots, std=1.0),
                    "scale": np.array(3.0, dtype=np.float32),
                }
        else:
            block["Mlp"] = {
                "Dense_0": {"kernel": normal(d, mlp), "bias": normal(mlp, std=0.1)},
                "Dense_1": {"kernel": normal(mlp, d), "bias": normal(d, std=0.1)},
            }
        encoder[f"encoderblock_{i}"] = block
    tree = {
        "embedding": {"kernel": normal(patch, patch, in_chans, d), "bias": normal(d, std=0.1)},
        "cls": normal(1, 1, d),
        "Encoder": encoder,
    }
    width_out = d
    if representation is not None:
        tree["pre_logits"] = {"kernel": normal(d, representation), "bias": normal(representation)}
        width_out = representation
    tree["head"] = {"kernel": normal(width_out, classes), "bias": normal(classes)}
    return tree


def _ln(x, scale, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def gelu_exact(x):
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def _softmax(x, axis=-1):
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def _moe_reference(x_btd, p, k, capacity_factor, group_images, gelu):
    """V-MoE layer as in the spec: groups of whole images, k-major filling, raw softmax gates."""
    b, t, d = x_btd.shape
    w_router = p["Router"]["dense"]["kernel"].reshape(d, -1)
    e = w_router.shape[1]
    w0, b0 = p["Mlp"]["Dense_0"]["kernel"], p["Mlp"]["Dense_0"]["bias"]
    w1, b1 = p["Mlp"]["Dense_1"]["kernel"], p["Mlp"]["Dense_1"]["bias"]
    s = group_images * t
    groups = x_btd.reshape(-1, s, d)
    capacity = math.ceil(s * k * capacity_factor / e)
    capacity += (-capacity) % 4
    out = np.zeros_like(groups)
    dropped = 0
    for g, xs in enumerate(groups):
        gates = _softmax(xs @ w_router)
        order = np.argsort(-gates, axis=1, kind="stable")[:, :k]
        fill = [0] * e
        for rank in range(k):
            for token in range(s):
                expert = order[token, rank]
                if fill[expert] < capacity:
                    h = gelu(xs[token] @ w0[expert] + b0[expert])
                    out[g, token] += gates[token, expert] * (h @ w1[expert] + b1[expert])
                else:
                    dropped += 1
                fill[expert] += 1
    return out.reshape(b, t, d), dropped


def _bf16(x):
    """Round to bfloat16 and back (vmoe's Soft MoE dispatch precision).

    vmoe rounds float32 activations; going through float32 first does the same to float64 ones.
    """
    return x.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def _soft_moe_reference(x_btd, p, group_tokens, gelu, bf16):
    """Soft MoE as in the spec: groups of ``group_tokens`` consecutive tokens, row-major."""
    b, t, d = x_btd.shape
    mu, scale = p["Router"]["mu"].astype(np.float64), float(p["Router"]["scale"])
    mu_n = mu / np.sqrt((mu**2).sum(0, keepdims=True) + 1e-6)  # unit slot columns
    w0, b0 = p["Mlp"]["Dense_0"]["kernel"], p["Mlp"]["Dense_0"]["bias"]
    w1, b1 = p["Mlp"]["Dense_1"]["kernel"], p["Mlp"]["Dense_1"]["bias"]
    e, slots = mu.shape[1:]
    out = []
    for xs in x_btd.reshape(-1, group_tokens, d):
        xn = xs / np.sqrt((xs**2).sum(-1, keepdims=True) + 1e-6)
        logits = scale * np.einsum("sd,dnp->snp", xn, mu_n)
        dispatch = _softmax(logits, axis=0)  # each slot: convex mix of the group's tokens
        combine = _softmax(logits.reshape(group_tokens, -1)).reshape(logits.shape)  # all slots
        slot_in = np.einsum("snp,sd->npd", dispatch, _bf16(xs) if bf16 else xs)
        expert_out = np.stack([gelu(slot_in[n] @ w0[n] + b0[n]) @ w1[n] + b1[n] for n in range(e)])
        expert_out = _bf16(expert_out) if bf16 else expert_out
        out.append(np.einsum("snp,npd->sd", combine, expert_out))
    return np.concatenate(out).reshape(b, t, d)


def flax_vit_reference(
    tree: dict,
    images: np.ndarray,
    *,
    eps: float = 1e-6,
    gelu=gelu_tanh,
    top_k: int = 2,
    capacity_factor: float = 1.05,
    group_images: int = 8,
    posemb_excludes_cls: bool = False,
    stats: dict | None = None,
    soft_group_tokens: int | None = None,
    soft_bf16: bool = False,
) -> np.ndarray:
    """Logits of a vmoe-layout ViT tree (float64), written from the spec, for parity tests.

    Soft MoE blocks (a ``Router/mu``) mix groups of ``soft_group_tokens`` tokens (default one
    image), rounding to bfloat16 around the experts when ``soft_bf16``.
    """
    p = tree
    x = images.astype(np.float64).transpose(0, 2, 3, 1)  # NHWC
    kernel = p["embedding"]["kernel"].astype(np.float64)
    patch = kernel.shape[0]
    b, h, w, c = x.shape
    gh, gw = h // patch, w // patch
    patches = x.reshape(b, gh, patch, gw, patch, c).transpose(0, 1, 3, 2, 4, 5)
    tokens = np.einsum("bijpqc,pqcd->bijd", patches, kernel).reshape(b, gh * gw, -1)
    tokens = tokens + p["embedding"]["bias"]
    enc = p["Encoder"]
    pos = enc["posembed_input"]["pos_embedding"]
    if posemb_excludes_cls:  # big_vision: position embedding first, class token after
        tokens = tokens + pos
    cls = np.broadcast_to(p["cls"], (b, 1, tokens.shape[-1]))
    x = np.concatenate([cls, tokens], 1)
    if not posemb_excludes_cls:
        x = x + pos
    layers = sorted(int(n.split("_")[1]) for n in enc if n.startswith("encoderblock_"))
    for i in layers:
        blk = enc[f"encoderblock_{i}"]
        y = _ln(x, blk["LayerNorm_0"]["scale"], blk["LayerNorm_0"]["bias"], eps)
        att = blk["SelfAttention"]
        q, k, v = (
            np.einsum("btd,dhk->bthk", y, att[n]["kernel"]) + att[n]["bias"]
            for n in ("query", "key", "value")
        )
        q = q / math.sqrt(q.shape[-1])
        weights = _softmax(np.einsum("bqhk,bshk->bhqs", q, k))
        o = np.einsum("bhqs,bshk->bqhk", weights, v)
        x = x + np.einsum("bqhk,hkd->bqd", o, att["out"]["kernel"]) + att["out"]["bias"]
        y = _ln(x, blk["LayerNorm_1"]["scale"], blk["LayerNorm_1"]["bias"], eps)
        if "Moe" in blk and "mu" in blk["Moe"]["Router"]:
            group = soft_group_tokens or x.shape[1]
            x = x + _soft_moe_reference(y, blk["Moe"], group, gelu, soft_bf16)
        elif "Moe" in blk:
            out, dropped = _moe_reference(y, blk["Moe"], top_k, capacity_factor, group_images, gelu)
            if stats is not None:
                stats[i] = dropped
            x = x + out
        else:
            mlp = blk["Mlp"]
            hidden = gelu(y @ mlp["Dense_0"]["kernel"] + mlp["Dense_0"]["bias"])
            x = x + hidden @ mlp["Dense_1"]["kernel"] + mlp["Dense_1"]["bias"]
    x = _ln(x, enc["encoder_norm"]["scale"], enc["encoder_norm"]["bias"], eps)
    pooled = x[:, 0]
    if "pre_logits" in p:
        pooled = np.tanh(pooled @ p["pre_logits"]["kernel"] + p["pre_logits"]["bias"])
    return pooled @ p["head"]["kernel"] + p["head"]["bias"]


@pytest.fixture
def vmoe_tree():
    return random_vmoe_tree


@pytest.fixture
def flax_reference():
    return flax_vit_reference
