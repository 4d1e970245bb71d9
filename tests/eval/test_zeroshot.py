"""Zero-shot classification, the `zeroshot` / `inspect` commands on a tiny LIMoE run."""

import json

import numpy as np
import pytest
import torch

from visionmoe.cli.main import main
from visionmoe.eval.zeroshot import class_embeddings, resolve_prompts, zeroshot_run
from visionmoe.recipes import get_recipe
from visionmoe.train.config import apply_set
from visionmoe.train.run import load_run, run_training

SCHEDULE = [
    "text.embed_dim=8",
    "data.max_train_examples=256",
    "train.batch_size=32",
    "train.steps=8",
    "train.eval_every=100",
    "train.eval_batch_size=512",
    "train.checkpoint_every=8",
    "schedule.warmup_steps=2",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model):
    out = tmp_path_factory.mktemp("runs") / "limoe"
    run_training(
        apply_set(get_recipe("digits_limoe"), [*tiny_model, *SCHEDULE]), run_dir=out, progress=False
    )
    return out


def test_zeroshot_run_accuracy(run_dir):
    result = zeroshot_run(str(run_dir))
    assert 0.0 <= result["accuracy"] <= 1.0
    assert result["num_examples"] == 450 and result["num_classes"] == 10
    assert result["prompts_per_class"] == [10] * 10
    summary = json.loads((run_dir / "summary.json").read_text())
    assert result["accuracy"] == pytest.approx(summary["zeroshot_accuracy"])
    custom = zeroshot_run(str(run_dir), ["the digit {}", "{}"])
    assert custom["prompts_per_class"] == [2] * 10 and custom["example_prompts"][0] == "the digit 0"


def test_class_embeddings_are_unit_vectors(run_dir):
    model, _ = load_run(run_dir)
    emb = class_embeddings(model, [["seven", "the digit 7"], ["eight"]])
    assert emb.shape == (2, 8)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_resolve_prompts_forms():
    names = ["cat", "dog"]
    assert resolve_prompts(["a {}"], names) == [["a cat"], ["a dog"]]
    assert resolve_prompts({"cat": ["kitty"], "dog": ["puppy"]}, names) == [["kitty"], ["puppy"]]
    assert resolve_prompts([["x"], ["y", "z"]], names) == [["x"], ["y", "z"]]
    assert resolve_prompts(None, [str(i) for i in range(10)])[7][1] == "the digit 7"
    assert resolve_prompts(None, names)[0][0] == "a photo of a cat"
    with pytest.raises(ValueError, match="must contain"):
        resolve_prompts(["no placeholder"], names)
    with pytest.raises(ValueError, match="one non-empty prompt list per class"):
        resolve_prompts([["x"]], names)
    with pytest.raises(ValueError, match="no prompts"):
        resolve_prompts({"cat": ["x"]}, names)


def test_cli_zeroshot_and_clear_errors(run_dir, capsys):
    assert main(["zeroshot", str(run_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0.0 <= result["accuracy"] <= 1.0
    assert main(["zeroshot", str(run_dir), "--template", "the number {}"]) == 0
    assert "zero-shot accuracy" in capsys.readouterr().out
    # Classification commands refuse a LIMoE run with one line pointing at `zeroshot`.
    assert main(["eval", str(run_dir)]) == 2
    assert "zeroshot" in capsys.readouterr().err


def test_inspect_shows_expert_usage_by_modality(run_dir, tmp_path):
    assert main(["inspect", str(run_dir), "--out", str(tmp_path)]) == 0
    html = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in html and "http://" not in html
    assert "zero-shot accuracy" in html and "marginal_entropy" in html
    assert (tmp_path / "modality_expert.png").is_file()
    stats = json.loads((tmp_path / "routing_stats.json").read_text())
    load = np.array(stats["layers"]["1"]["load"])
    assert load.shape == (2, 4)
    np.testing.assert_allclose(load.sum(axis=1), 1.0)
    assert set(stats["layers"]["1"]["metrics"]) == {"image", "text", "mixed"}
