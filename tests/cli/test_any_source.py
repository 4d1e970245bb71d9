"""Every command that takes a model takes any source, and refuses a bad one in one line."""

from __future__ import annotations

import json

import pytest
import torch

from visionmoe.cli.main import main
from visionmoe.hub import save_pretrained
from visionmoe.loading import build_model
from visionmoe.recipes import get_recipe
from visionmoe.train.config import apply_set

TINY = [
    "model.hidden_size=16",
    "model.mlp_dim=32",
    "model.num_heads=2",
    "model.num_layers=2",
    "model.moe_layers=1",
    "model.num_experts=4",
]
SHORT = ["train.steps=2", "train.eval_every=2", "train.checkpoint_every=2", "train.threads=1"]
SHORT += ["data.max_train_examples=64", "schedule.warmup_steps=1"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(apply_set(get_recipe("digits_vmoe"), TINY))
    return save_pretrained(model, tmp_path_factory.mktemp("models") / "digits_pretrained")


def test_eval_a_pretrained_folder_on_named_data(pretrained, capsys, one_thread):
    args = ["eval", str(pretrained), "--set", "data.kind=digits", "--batch-size", "64", "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["source_kind"] == "pretrained" and result["preprocess"] == "resize(8)"
    assert 0 <= result["accuracy"] <= 1 and result["num_examples"] > 0


def test_a_pretrained_folder_has_no_data_of_its_own(pretrained, capsys):
    assert main(["eval", str(pretrained)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--data PATH" in err and str(pretrained) in err


def test_train_init_from_a_pretrained_folder_needs_a_recipe(pretrained, tmp_path, capsys):
    assert main(["train", "--init", str(pretrained), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("visionmoe train: error:") and "--recipe" in err
    assert err.count("\n") == 1 and str(pretrained) in err
    run = tmp_path / "ft"
    args = ["train", "--recipe", "digits_vmoe", "--init", str(pretrained), "--no-progress"]
    assert main([*args, "--run-dir", str(run), "--set", *TINY, *SHORT]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["init"] == str(pretrained) and summary["steps"] == 2


@pytest.mark.parametrize(
    "command",
    [
        ["eval"],
        ["sweep"],
        ["inspect"],
        ["fewshot"],
        ["predict", "SOURCE", "image.png"],
        ["upcycle", "SOURCE", "--out", "OUT"],
        ["train", "--recipe", "digits_vmoe", "--init"],
    ],
)
def test_every_command_refuses_a_bad_source_in_one_line(command, tmp_path, capsys):
    bad = str(tmp_path / "no_such_model")
    args = [a.replace("SOURCE", bad).replace("OUT", str(tmp_path / "o")) for a in command]
    if "SOURCE" not in command:
        args.append(bad)
    if command[0] == "train":
        args += ["--run-dir", str(tmp_path / "r")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"visionmoe {command[0]}: error: cannot open model '{bad}'")
    assert err.count("\n") == 1 and "save_pretrained folder" in err


def test_upcycle_a_pretrained_dense_model_into_a_pretrained_folder(tmp_path, capsys, one_thread):
    from visionmoe.loading import load_model

    torch.manual_seed(0)
    dense = build_model(get_recipe("digits_vit"))
    folder = save_pretrained(dense, tmp_path / "dense")
    out = tmp_path / "moe"
    assert main(["upcycle", str(folder), "--out", str(out), "--set", "num_experts=4"]) == 0
    assert f"visionmoe train --recipe RECIPE --init {out}" in capsys.readouterr().out
    model, info = load_model(out)
    assert info.kind == "pretrained" and info.model_config.moe.num_experts == 4
    assert main(["upcycle", str(folder), "--out", str(out), "--set", "train.steps=3"]) == 2
    assert "holds no training settings" in capsys.readouterr().err
