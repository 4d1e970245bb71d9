"""A tiny LIMoE contrastive run through run_training: run directory, resume, config plumbing."""

import json
import shutil

import pytest
import torch

from visionmoe.models.limoe import LIMoE
from visionmoe.recipes import get_recipe
from visionmoe.train.checkpoint import atomic_write_text, load_checkpoint
from visionmoe.train.config import ExperimentConfig, apply_set
from visionmoe.train.run import load_run, run_training

SCHEDULE = [
    "text.embed_dim=8",
    "data.max_train_examples=256",
    "train.batch_size=32",
    "train.eval_every=100",
    "train.eval_batch_size=512",
    "train.checkpoint_every=6",
    "train.log_every=3",
    "schedule.warmup_steps=2",
]


@pytest.fixture
def tiny(tiny_model):
    """A builder of tiny ``digits_limoe`` configs: ``tiny(steps, extra_overrides)``."""

    def build(steps: int = 12, extra=()):
        overrides = [*tiny_model, *SCHEDULE, f"train.steps={steps}", *extra]
        return apply_set(get_recipe("digits_limoe"), overrides)

    return build


def test_text_section_round_trips_and_is_typed(tiny):
    cfg = tiny(extra=["text.temperature_init=0.05", "text.tau_text=none", "text.max_len=12"])
    assert cfg.text.temperature_init == 0.05 and cfg.text.tau_text is None
    assert ExperimentConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(ValueError, match="text.temperature_init"):
        apply_set(cfg, ["text.temperature_init=-1"])
    with pytest.raises(ValueError, match="LIMoE"):
        apply_set(get_recipe("digits_vmoe"), ["text.max_len=8"])
    # Classification configs saved before the text section existed still load.
    old = get_recipe("digits_vmoe").to_dict()
    del old["text"]
    assert ExperimentConfig.from_dict(old).text is None


def test_contrastive_run_writes_run_dir_and_resumes_exactly(tmp_path, tiny):
    run_dir = tmp_path / "run"
    summary = run_training(tiny(12), run_dir=run_dir, progress=False)
    for name in ("config.json", "metrics.jsonl", "summary.json", "classes.json"):
        assert (run_dir / name).is_file()
    assert summary["steps"] == 12 and 0.0 <= summary["test_accuracy"] <= 1.0
    assert summary["test_accuracy"] == summary["zeroshot_accuracy"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [3, 6, 9, 12]
    assert "moe/layer1/text/dropped_frac" in train[-1]
    assert "moe/layer1/image/marginal_entropy" in train[-1]
    assert "eval/digits/zeroshot_accuracy" in records[-1]
    final = load_checkpoint(run_dir)["model"]

    # Pretend the run died after step 6: rewind `latest`, resume, and land on the same weights.
    ckpts = run_dir / "checkpoints"
    shutil.rmtree(ckpts / "step_0000012")
    atomic_write_text(ckpts / "latest", "step_0000006")
    resumed = run_training(resume=run_dir, progress=False)
    assert resumed["resumed_from_step"] == 6 and resumed["steps"] == 12
    assert resumed["test_accuracy"] == summary["test_accuracy"]
    again = load_checkpoint(run_dir)["model"]
    for key, value in final.items():
        assert torch.allclose(value, again[key], atol=1e-6), key
    steps = [
        json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [r["step"] for r in records]

    model, config = load_run(run_dir)
    assert isinstance(model, LIMoE) and not model.training and config.text is not None
