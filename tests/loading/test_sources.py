"""load_model opens every kind of source to the same model and says what it knows about it."""

from __future__ import annotations

import json

import pytest
import torch

from visionmoe.hub import save_pretrained
from visionmoe.loading import EvalPreprocess, SourceError, detect_source, load_model, load_state
from visionmoe.loading.sources import build_model
from visionmoe.recipes import get_recipe
from visionmoe.train.checkpoint import save_checkpoint
from visionmoe.train.config import apply_set
from visionmoe.train.rundir import initial_config

TINY = [
    "model.hidden_size=16",
    "model.mlp_dim=32",
    "model.num_heads=2",
    "model.num_layers=2",
    "model.moe_layers=1",
    "model.num_experts=4",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as training leaves it: config.json, classes.json, checkpoints/latest."""
    torch.manual_seed(0)
    config = apply_set(get_recipe("digits_vmoe"), TINY)
    model = build_model(config)
    out = tmp_path_factory.mktemp("runs") / "tiny"
    save_checkpoint(out, 7, model, None, config.to_dict())
    (out / "config.json").write_text(config.to_json())
    (out / "classes.json").write_text(json.dumps([f"digit {i}" for i in range(10)]))
    return out


def _logits(model, in_chans=1, size=8):
    x = torch.linspace(-1, 1, 2 * in_chans * size * size).reshape(2, in_chans, size, size)
    with torch.no_grad():
        return model(x)


def test_run_checkpoint_and_pretrained_folder_open_to_the_same_model(run_dir, tmp_path):
    model, info = load_model(run_dir)
    assert info.kind == "run" and info.step == 7 and info.experiment.name == "digits_vmoe"
    assert info.class_names[3] == "digit 3" and info.checkpoint.name == "step_0000007"
    assert info.preprocess == EvalPreprocess(size=8, pipeline="training") and not model.training

    ckpt = run_dir / "checkpoints" / "step_0000007"
    from_ckpt, ckpt_info = load_model(ckpt)
    assert ckpt_info.kind == "checkpoint" and ckpt_info.class_names == info.class_names

    names = list("abcdefghij")
    folder = save_pretrained(model, tmp_path / "pretrained", extra={"class_names": names})
    from_folder, folder_info = load_model(folder)
    assert folder_info.kind == "pretrained" and folder_info.experiment is None
    assert folder_info.class_names == tuple("abcdefghij")
    # Not 224 px, so vmoe's rule gives a square resize to the model's size.
    assert folder_info.preprocess == EvalPreprocess(size=8)
    for other in (from_ckpt, from_folder):
        torch.testing.assert_close(_logits(other), _logits(model), rtol=0, atol=0)
    state = load_state(folder)
    assert state.keys() == model.state_dict().keys()


def test_overrides_change_routing_and_resolution(run_dir):
    model, info = load_model(run_dir, capacity_factor=0.5, image_size=16)
    assert info.model_config.moe.capacity_factor == 0.5
    assert info.image_size == 16 and info.preprocess.size == 16
    # digits_vmoe: patch 2, GAP head (no class token): (16 / 2)^2 = 64 positions, was (8 / 2)^2.
    assert model.pos_embed.shape[1] == 64
    assert _logits(model, size=16).shape == (2, 10)


def test_vmoe_prefix_opens_with_or_without_index_suffix(vmoe_prefix):
    model, info = load_model(vmoe_prefix)
    assert info.kind == "vmoe" and info.experiment is None and info.num_classes == 3
    assert info.class_names == ("0", "1", "2") and info.preprocess == EvalPreprocess(size=8)
    assert detect_source(f"{vmoe_prefix}.index") == "vmoe"
    again, _ = load_model(f"{vmoe_prefix}.index", capacity_factor=4.0)
    torch.testing.assert_close(_logits(again, 3), _logits(model, 3), rtol=0, atol=1e-6)


def test_a_preset_is_for_vmoe_prefixes_only(run_dir):
    with pytest.raises(ValueError, match="vmoe checkpoint prefixes only"):
        load_model(run_dir, preset="vmoe_s32_last2_ilsvrc2012")


def test_vmoe_rule_for_eval_preprocessing():
    # PIPELINE.md section 1: 224-px evaluations read resize_small(256) | central_crop(224);
    # fine-tuned models at S (384, 128) read a square resize(S).
    assert EvalPreprocess.vmoe_default(224) == EvalPreprocess(size=224, resize_small=256)
    assert EvalPreprocess.vmoe_default(224).describe() == "resize_small(256) | central_crop(224)"
    assert EvalPreprocess.vmoe_default(384).describe() == "resize(384)"
    with pytest.raises(ValueError, match="preprocess.resize_small"):
        EvalPreprocess(size=224, resize_small=200)
    with pytest.raises(ValueError, match="preprocess.size"):
        EvalPreprocess(size=0)


@pytest.mark.parametrize("make", ["missing", "empty_dir", "file", "config_only"])
def test_unopenable_sources_fail_in_one_line_naming_the_path(tmp_path, make):
    path = tmp_path / make
    if make == "empty_dir":
        path.mkdir()
    elif make == "file":
        path.write_text("not a model")
    elif make == "config_only":
        path.mkdir()
        (path / "config.json").write_text("{}")
    with pytest.raises(SourceError) as err:
        load_model(path)
    message = str(err.value)
    assert f"'{path}'" in message and "\n" not in message
    assert "save_pretrained folder" in message and "PREFIX.index" in message


def test_initial_config_needs_a_recipe_for_sources_without_settings(run_dir, tmp_path, vmoe_prefix):
    assert initial_config(None, run_dir).name == "digits_vmoe"
    assert initial_config("digits_vit", vmoe_prefix).name == "digits_vit"
    for source in (vmoe_prefix, save_pretrained(load_model(run_dir).model, tmp_path / "p")):
        with pytest.raises(ValueError, match="--recipe") as err:
            initial_config(None, source)
        assert str(source) in str(err.value)
