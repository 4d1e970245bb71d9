"""Sparse upcycling: step-0 equality, optimizer carry-over, and the run-directory CLI path."""

from __future__ import annotations

import json

import pytest
import torch

import visionmoe
from visionmoe.models.vit import VisionTransformer
from visionmoe.recipes import get_recipe
from visionmoe.train.checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from visionmoe.train.finetune import load_init_weights
from visionmoe.train.optim import build_optimizer
from visionmoe.train.run import load_run
from visionmoe.upcycle import (
    load_named_optimizer_state,
    named_optimizer_state,
    upcycle,
    upcycle_cli,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _dense(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    model = visionmoe.create_model("vit_debug").eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)  # the zero init would hide differences
    return model


@pytest.mark.parametrize("top_k", [1, 2])
def test_step0_equals_dense_with_normalized_combine(top_k):
    dense = _dense()
    moe = upcycle(dense, num_experts=4, top_k=top_k, normalize_combine=True, capacity_factor=50.0)
    assert moe.config.moe_layers == (1, 3) and moe.config.moe.renormalize and not moe.training
    images = torch.rand(6, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        logits, aux = moe(images, return_aux=True)
        torch.testing.assert_close(logits, dense(images), atol=1e-5, rtol=0)
    assert all(float(a.metrics["dropped_frac"]) == 0 for a in aux.layers.values())
    # Raw softmax gates (V-MoE default) scale each token's MLP output by its top-K mass.
    raw = upcycle(dense, num_experts=4, top_k=top_k, capacity_factor=50.0)
    with torch.no_grad():
        assert (raw(images) - dense(images)).abs().max() > 1e-3


def test_experts_are_copies_and_everything_else_is_kept():
    dense = _dense(1)
    moe = upcycle(dense, moe_layers=[3], num_experts=3, seed=0, router_init_std=0.01)
    experts = moe.blocks[3].ffn.experts
    mlp = dense.blocks[3].ffn
    for e in range(3):
        torch.testing.assert_close(experts.w1[e], mlp.fc1.weight.T, rtol=0, atol=0)
        torch.testing.assert_close(experts.b2[e], mlp.fc2.bias, rtol=0, atol=0)
    own = moe.state_dict()
    for key, value in dense.state_dict().items():
        if not key.startswith("blocks.3.ffn."):
            torch.testing.assert_close(own[key], value, rtol=0, atol=0)
    assert moe.blocks[3].ffn.router.proj.weight.std() < 0.02
    again = upcycle(dense, moe_layers=[3], num_experts=3, seed=0, router_init_std=0.01)
    torch.testing.assert_close(again.state_dict(), own, rtol=0, atol=0)
    noisy = upcycle(dense, moe_layers=[3], num_experts=3, expert_noise=1e-3)
    w1 = noisy.blocks[3].ffn.experts.w1
    assert not torch.equal(w1[0], w1[1]) and (w1[0] - mlp.fc1.weight.T).abs().max() < 1e-2


def test_expert_choice_and_argument_errors():
    dense = _dense(2)
    ec = upcycle(dense, num_experts=4, router="expert_choice")
    assert ec.config.moe.router == "expert_choice" and ec.config.moe.capacity_factor == 2.0
    assert ec.config.moe.group_images == 1
    assert ec(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="normalize_combine is only supported"):
        upcycle(dense, router="expert_choice", normalize_combine=True)
    with pytest.raises(ValueError, match="top_k applies"):
        upcycle(dense, router="expert_choice", top_k=2)
    with pytest.raises(ValueError, match="router must be one of"):
        upcycle(dense, router="soft")
    with pytest.raises(ValueError, match="already has MoE blocks"):
        upcycle(visionmoe.create_model("vmoe_debug"))
    with pytest.raises(ValueError, match="out of range"):
        upcycle(dense, moe_layers=[7])


def _train_steps(model, optimizer, steps=2):
    model.train()
    for _ in range(steps):
        loss = model(torch.rand(4, 3, 32, 32)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_optimizer_state_carry_over():
    dense = _dense(3)
    optimizer = build_optimizer(dense, get_recipe("digits_vit").optim)
    _train_steps(dense, optimizer)
    named = named_optimizer_state(dense, optimizer)
    moe, state = upcycle(dense, num_experts=4, optimizer_state=optimizer)
    for block in (1, 3):
        fc1 = named[f"blocks.{block}.ffn.fc1.weight"]
        w1 = state[f"blocks.{block}.ffn.experts.w1"]
        assert w1["exp_avg"].shape == (4, 32, 64)
        for e in range(4):
            torch.testing.assert_close(w1["exp_avg"][e], fc1["exp_avg"].T, rtol=0, atol=0)
            torch.testing.assert_close(w1["exp_avg_sq"][e], fc1["exp_avg_sq"].T, rtol=0, atol=0)
        torch.testing.assert_close(w1["step"], fc1["step"])
        b2 = state[f"blocks.{block}.ffn.experts.b2"]["exp_avg"]
        torch.testing.assert_close(b2[2], named[f"blocks.{block}.ffn.fc2.bias"]["exp_avg"])
        assert f"blocks.{block}.ffn.router.proj.weight" not in state  # fresh router slots
    torch.testing.assert_close(state["blocks.0.attn.qkv.weight"], named["blocks.0.attn.qkv.weight"])
    new_optimizer = build_optimizer(moe, get_recipe("digits_vit").optim)
    load_named_optimizer_state(moe, new_optimizer, state)
    reloaded = named_optimizer_state(moe, new_optimizer)
    torch.testing.assert_close(
        reloaded["blocks.1.ffn.experts.w2"], state["blocks.1.ffn.experts.w2"]
    )
    _train_steps(moe, new_optimizer, steps=1)  # router slots are created on the fly
    assert "blocks.1.ffn.router.proj.weight" in named_optimizer_state(moe, new_optimizer)


@pytest.fixture
def dense_run(tmp_path):
    """A run directory as training leaves it (digits_vit architecture, a few steps)."""
    config = get_recipe("digits_vit")
    torch.manual_seed(0)
    model = VisionTransformer(config.model)
    torch.nn.init.normal_(model.head.weight, std=0.5)
    optimizer = build_optimizer(model, config.optim)
    model.train()
    for _ in range(2):
        loss = model(torch.rand(8, 1, 8, 8)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    run = tmp_path / "dense"
    save_checkpoint(run, 2, model, optimizer, config.to_dict())
    atomic_write_text(run / "config.json", config.to_json())
    return run


def test_cli_output_loads_as_a_run_and_as_init_weights(dense_run, tmp_path):
    overrides = [
        "num_experts=4",
        "model.moe_layers=1,3",
        "normalize_combine=true",
        "capacity_factor=50",
        "eval_capacity_factor=50",
        "train.steps=7",
        "reuse_optimizer_state=true",
    ]
    out = upcycle_cli(dense_run, tmp_path / "moe", overrides)
    model, config = load_run(out)
    dense, _ = load_run(dense_run)
    assert config.model.moe_layers == (1, 3) and config.model.moe.num_experts == 4
    assert config.train.steps == 7 and config.data == get_recipe("digits_vit").data
    images = torch.rand(16, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model(images), dense(images), atol=1e-5, rtol=0)
    # What `visionmoe train --init OUT` does with these weights:
    fresh = VisionTransformer(config.model)
    assert load_init_weights(fresh, load_checkpoint(out)["model"]) == []
    # The carried-over optimizer state loads into the optimizer training would build.
    ckpt = load_checkpoint(out, with_optimizer=True)
    build_optimizer(fresh, config.optim).load_state_dict(ckpt["optimizer"])
    record = json.loads((out / "upcycle.json").read_text())
    assert "model.num_experts=4" in record["train_set"]
    assert "model.moe_layers=1,3" in record["train_set"]
    assert json.loads((out / "config.json").read_text())["model"]["moe"]["num_experts"] == 4


def test_cli_rejects_unknown_options(dense_run, tmp_path):
    with pytest.raises(ValueError, match="unknown upcycle option"):
        upcycle_cli(dense_run, tmp_path / "x", ["experts=4"])
    with pytest.raises(ValueError, match="key=value"):
        upcycle_cli(dense_run, tmp_path / "x", ["num_experts"])
    with pytest.raises(ValueError, match="unknown upcycle option"):
        upcycle_cli(dense_run, tmp_path / "x", ["model.hidden_size=8"])


def test_upcycle_accepts_a_run_directory(dense_run):
    moe = upcycle(dense_run, num_experts=2)
    assert moe.config.moe_layers == (1, 3) and moe.config.in_chans == 1
