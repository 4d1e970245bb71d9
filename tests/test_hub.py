"""save_pretrained / from_pretrained: identical models, clear errors, nothing pickled."""

from __future__ import annotations

import json

import pytest
import torch

import visionmoe
from visionmoe.hub import PretrainedError, from_pretrained, save_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(name: str = "vmoe_debug"):
    torch.manual_seed(0)
    model = visionmoe.create_model(name, eval_capacity_factor=4.0).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return model


@pytest.mark.parametrize("name", ["vmoe_debug", "vit_debug", "softmoe_debug"])
def test_round_trip_gives_identical_outputs(tmp_path, name):
    model = _model(name) if name == "vmoe_debug" else visionmoe.create_model(name).eval()
    out = save_pretrained(model, tmp_path / "m")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "visionmoe_vit" and config["library"] == "visionmoe"
    assert config["visionmoe_version"] == visionmoe.__version__
    loaded = from_pretrained(out)
    assert loaded.config == model.config and not loaded.training
    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), rtol=0, atol=0)


def test_overwrite_and_overrides(tmp_path):
    model = _model()
    save_pretrained(visionmoe.create_model("vit_debug"), tmp_path / "m")
    save_pretrained(model, tmp_path / "m")  # replaces the previous model atomically
    assert not [p for p in (tmp_path / "m").iterdir() if p.name.startswith(".")]
    loaded = from_pretrained(tmp_path / "m", capacity_factor=2.0, num_classes=3)
    assert loaded.config.moe.capacity_factor == 2.0 and loaded.head.weight.shape == (3, 32)
    torch.testing.assert_close(loaded.blocks[1].ffn.experts.w1, model.blocks[1].ffn.experts.w1)


def test_missing_or_broken_files_give_clear_errors(tmp_path):
    with pytest.raises(PretrainedError, match="no pretrained model folder"):
        from_pretrained(tmp_path / "nope")
    out = save_pretrained(_model(), tmp_path / "m")
    (out / "model.safetensors").unlink()
    with pytest.raises(PretrainedError, match="no model.safetensors"):
        from_pretrained(out)
    save_pretrained(_model(), out)
    (out / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(PretrainedError, match="truncated or corrupted"):
        from_pretrained(out)
    (out / "config.json").unlink()
    with pytest.raises(PretrainedError, match="no config.json"):
        from_pretrained(out)
    (out / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(PretrainedError, match="not 'visionmoe_vit'"):
        from_pretrained(out)


def test_weights_that_do_not_match_the_config(tmp_path):
    out = save_pretrained(_model(), tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    config["mlp_dim"] = 128
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(PretrainedError, match="does not match config.json"):
        from_pretrained(out)
