"""Tiny model sources of every kind: a run, its checkpoint, a pretrained folder, a vmoe prefix."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from visionmoe.convert import write_vmoe_checkpoint

# The tiny vmoe architecture the tests share: width 16, 2 heads, 2 blocks (block 1 MoE with 4
# experts), patch 4 on 8-px RGB images (4 patches + class token), 3 classes, no pre-logits.
TINY_VMOE = dict(width=16, heads=2, mlp=32, layers=2, moe_layers=(1,), experts=4, patch=4)
TINY_VMOE_SET = [
    "model.hidden_size=16",
    "model.num_heads=2",
    "model.mlp_dim=32",
    "model.num_layers=2",
    "model.moe_layers=1",
    "model.num_experts=4",
    "model.patch_size=4",
    "model.in_chans=3",
    "model.classifier=token",
    "model.representation_size=none",
]


def tiny_vmoe_tree(
    seed: int = 0, image: int = 8, classes: int = 3, members: int = 1, pre_logits: int | None = None
) -> dict:
    """A random nested parameter tree named as the released checkpoints (CHECKPOINT_FORMAT.md)."""
    rng = np.random.default_rng(seed)
    t = TINY_VMOE
    d, heads, mlp, e, p = t["width"], t["heads"], t["mlp"], t["experts"], t["patch"]

    def normal(*shape, std=0.3):
        return (std * rng.standard_normal(shape)).astype(np.float32)

    def norm():
        return {"scale": 1 + normal(d, std=0.1), "bias": normal(d, std=0.1)}

    encoder: dict = {
        "posembed_input": {"pos_embedding": normal(1, (image // p) ** 2 + 1, d)},
        "encoder_norm": norm(),
    }
    for i in range(t["layers"]):
        attention = {
            name: {"kernel": normal(d, heads, d // heads), "bias": normal(heads, d // heads)}
            for name in ("query", "key", "value")
        }
        attention["out"] = {"kernel": normal(heads, d // heads, d), "bias": normal(d)}
        block = {"LayerNorm_0": norm(), "LayerNorm_1": norm(), "SelfAttention": attention}
        if i in t["moe_layers"]:
            # E^3 stores the router as (D, M, E/M): one slice per ensemble member.
            router = normal(d, e, std=1.0) if members == 1 else normal(d, members, e // members)
            block["Moe"] = {
                "Mlp": {
                    "Dense_0": {"kernel": normal(e, d, mlp), "bias": normal(e, mlp)},
                    "Dense_1": {"kernel": normal(e, mlp, d), "bias": normal(e, d)},
                },
                "Router": {"dense": {"kernel": router}},
            }
        else:
            block["Mlp"] = {
                "Dense_0": {"kernel": normal(d, mlp), "bias": normal(mlp)},
                "Dense_1": {"kernel": normal(mlp, d), "bias": normal(d)},
            }
        encoder[f"encoderblock_{i}"] = block
    tree = {
        "embedding": {"kernel": normal(p, p, 3, d), "bias": normal(d)},
        "cls": normal(1, 1, d),
        "Encoder": encoder,
        "head": {"kernel": normal(pre_logits or d, classes), "bias": normal(classes)},
    }
    if pre_logits:
        tree["pre_logits"] = {"kernel": normal(d, pre_logits), "bias": normal(pre_logits)}
    return tree


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every loading test runs on one thread (see tests/conftest.py)."""


@pytest.fixture(scope="session")
def vmoe_prefix(tmp_path_factory):
    """A tiny official-format checkpoint: ``PREFIX.index`` + two data shards."""
    prefix = tmp_path_factory.mktemp("vmoe") / "tiny_vmoe"
    write_vmoe_checkpoint(prefix, tiny_vmoe_tree(), num_shards=2, max_chunk_bytes=512)
    return prefix


def write_image_folder(root, splits=("train", "val"), classes=3, per_class=4, size=12, seed=0):
    """ImageNet's layout: ``root/<split>/<class>/<n>.jpg``; class c is brightest in channel c."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in splits:
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for n in range(per_class):
                pixels = rng.integers(0, 60, (size, size, 3))
                pixels[..., c % 3] += 180
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{n}.jpg")
    return root


@pytest.fixture(scope="session")
def imagenet_folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("imagenet") / "data")


@pytest.fixture(scope="session")
def stand_ins():
    """The helpers above, for tests (which cannot import this conftest by name)."""
    return SimpleNamespace(
        tree=tiny_vmoe_tree, image_folder=write_image_folder, model_set=list(TINY_VMOE_SET)
    )
