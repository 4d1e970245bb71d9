"""The distributed entry point's --init takes any model source, like visionmoe train --init."""

from __future__ import annotations

import json

import pytest
import torch

from visionmoe.distributed.train import main
from visionmoe.hub import save_pretrained
from visionmoe.loading import build_model
from visionmoe.recipes import get_recipe


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    torch.manual_seed(0)
    return save_pretrained(
        build_model(get_recipe("digits_vmoe")), tmp_path_factory.mktemp("m") / "digits"
    )


def test_init_from_a_pretrained_folder_without_a_recipe_is_refused(pretrained):
    # Refused before joining a process group: nothing to wait for on the other ranks.
    with pytest.raises(ValueError, match="no training settings; name a recipe with --recipe"):
        main(["--init", str(pretrained)])


def test_two_ranks_fine_tune_from_a_pretrained_folder(pretrained, tmp_path, launcher):
    run = tmp_path / "run"
    args = ["--recipe", "digits_vmoe", "--init", str(pretrained), "--run-dir", str(run)]
    steps = ["train.steps=2", "train.batch_size=16", "train.eval_every=1000", "train.threads=1"]
    launcher.check_ok(
        launcher.run_train([*args, "--no-progress", "--set", *steps], 2, tmp_path / "logs")
    )
    summary = json.loads((run / "summary.json").read_text())
    assert summary["init"] == str(pretrained) and summary["steps"] == 2
