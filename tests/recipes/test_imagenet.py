"""The ImageNet S/32 recipes: settings vs PIPELINE.md section 4, and a shrunk run on a folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from visionmoe.cli.main import main
from visionmoe.data import load_dataset
from visionmoe.data.ops import (
    CentralCrop,
    FlipLR,
    InceptionCrop,
    RandAugment,
    ResizeSmall,
    Transform,
)
from visionmoe.eval.inputs import eval_transform
from visionmoe.loading import load_model
from visionmoe.recipes import get_recipe
from visionmoe.train.config import apply_set
from visionmoe.train.inputs import TrainStream


def test_s32_recipe_matches_the_released_config():
    c = get_recipe("imagenet_vmoe_s32_light1")
    m = c.model
    assert (m.num_layers, m.hidden_size, m.mlp_dim, m.num_heads, m.patch_size) == (
        8,
        512,
        2048,
        8,
        32,
    )
    assert m.moe_layers == (5, 7) and m.moe.num_experts == 8 and m.moe.top_k == 2
    assert (m.moe.capacity_factor, m.moe.eval_capacity_factor) == (1.05, 4.0)
    assert m.moe.expert_dropout == 0.2 and m.dropout == 0.0
    assert m.representation_size == 512 and m.num_classes == 1000
    assert math.isclose(m.head_bias_init, -math.log(1000))
    # 300 epochs of 1,268,355 images at batch 8192: 380,506,500 / 8192 = 46,448.5 -> 46,449.
    assert c.train.steps == math.ceil(300 * 1_268_355 / 8192) == 46_449
    assert c.train.batch_size == 8192 and c.train.loss == "sigmoid" and c.train.eval_every == 1000
    assert (c.optim.name, c.optim.lr, c.optim.weight_decay, c.optim.grad_clip) == (
        "adamw", 3e-3, 0.1, 1.0,
    )  # fmt: skip
    assert (c.schedule.name, c.schedule.warmup_steps, c.schedule.end_lr) == ("linear", 10_000, 1e-5)
    p = c.preprocess
    assert p.train_ops(224) == (
        InceptionCrop(size=224),
        FlipLR(),
        RandAugment(num_layers=2, magnitude=10.0),
    )
    assert [type(op).__name__ for op in p.eval_ops(224)] == ["ResizeSmall", "CentralCrop"]
    assert (p.mixup_concentration, p.mixup_size, p.mixup_granularity) == (0.2, 2, "device")
    twin = get_recipe("imagenet_vit_s32_light1")
    assert twin.model.moe is None and twin.model.wide_mlp_layers == (5, 7)
    assert twin.preprocess == p and twin.train == c.train and twin.optim == c.optim


def write_folder(root: Path, per_class: int = 6, classes: int = 3) -> None:
    """``train/<class>/*.JPEG`` and ``val/<class>/*.JPEG`` of varied sizes."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", 2)):
        for c in range(classes):
            folder = root / split / f"n0{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = rng.integers(30, 70, 2)
                pixels = rng.integers(0, 60, (h, w, 3), dtype=np.uint8) + 80 * c
                Image.fromarray(pixels).save(folder / f"{c}_{i}.JPEG", quality=90)


SHRINK = [
    "model.image_size=32",
    "model.patch_size=8",
    "model.representation_size=16",
    "train.batch_size=8",
    "train.eval_batch_size=8",
    "schedule.warmup_steps=1",
    "preprocess.eval_resize_small=36",
    "data.num_workers=0",
]


def test_recipe_stream_is_deterministic_and_rank_shares_make_the_global_batch(tmp_path, one_thread):
    write_folder(tmp_path)
    config = apply_set(
        get_recipe("imagenet_vmoe_s32_light1"),
        [*SHRINK, "model.num_classes=3", "preprocess.mixup_chunk_size=4", "train.steps=9"],
    )
    source = load_dataset("folder", tmp_path).train
    whole = TrainStream(config, source)
    again = TrainStream(config, source)
    halves = [TrainStream(config, source, rank=r, world_size=2) for r in range(2)]
    for step in (0, 7):
        x, y, _ = whole.batch(step)
        assert x.shape == (8, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
        # Mixed soft targets: (n, classes), each row sums to 1, weight on the own label >= 0.5.
        assert y.shape == (8, 3)
        torch.testing.assert_close(y.sum(1), torch.ones(8))
        x2, y2, _ = again.batch(step)
        assert torch.equal(x, x2) and torch.equal(y, y2)  # a pure function of (seed, step)
        parts = [half.batch(step) for half in halves]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
    x0, _, _ = whole.batch(8)
    assert not torch.equal(x0, x)
    for stream in (whole, again, *halves):
        stream.close()


def test_recipes_run_shrunk_on_a_tiny_imagenet_folder(tmp_path, tiny_model):
    write_folder(tmp_path / "data")
    for name in ("imagenet_vmoe_s32_light1", "imagenet_vit_s32_light1"):
        run_dir = tmp_path / name
        argv = ["train", "--recipe", name, "--data", str(tmp_path / "data"), "--no-progress"]
        overrides = [*SHRINK, "train.steps=3", "train.eval_every=3", "train.checkpoint_every=3"]
        model = tiny_model
        if name == "imagenet_vit_s32_light1":  # the dense twin: no MoE, one 2x-wide MLP
            model = [o for o in tiny_model if "moe" not in o and "experts" not in o]
            model.append("model.wide_mlp_layers=1")
        code = main([*argv, "--run-dir", str(run_dir), "--set", *model, *overrides])
        assert code in (0, None)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["steps"] == 3 and summary["test_accuracy"] is not None
        saved = json.loads((run_dir / "config.json").read_text())
        assert saved["preprocess"]["randaug_layers"] == 2 and saved["train"]["loss"] == "sigmoid"
    # Evaluating the run later uses its preprocess section: resize_small(36) + central_crop(32).
    info = load_model(tmp_path / "imagenet_vmoe_s32_light1").info
    transform = eval_transform(load_dataset("folder", tmp_path / "data").test, info)
    assert transform == Transform(ops=(ResizeSmall(size=36), CentralCrop(size=32)))
