"""Streamed training input: rank shares of augmented batches, and a run on an ImageNet folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from visionmoe.cli.main import main
from visionmoe.data import load_dataset
from visionmoe.recipes import get_recipe
from visionmoe.train.config import apply_set
from visionmoe.train.inputs import TrainStream, eval_stream


def test_rank_shares_of_augmented_batches_make_the_global_batch(one_thread):
    config = apply_set(
        get_recipe("digits_vmoe"),
        ["train.batch_size=8", "data.crop_padding=1", "data.hflip=true", "train.steps=20"],
    )
    source = load_dataset("digits").train
    whole = TrainStream(config, source)
    halves = [TrainStream(config, source, rank=r, world_size=2) for r in range(2)]
    for step in (4, 5, 17):
        x, y, _ = whole.batch(step)
        parts = [half.batch(step) for half in halves]
        torch.testing.assert_close(torch.cat([p[0] for p in parts]), x, rtol=0, atol=0)
        assert torch.cat([p[1] for p in parts]).tolist() == y.tolist()
        # Model input is the [-1, 1] image: digits pixels are k * 255 / 16 rounded, so the
        # padded-and-cropped batch holds -1 (black), 1 (white) and the zero padding value.
        assert x.min() >= -1 and x.max() <= 1 and x.shape == (8, 1, 8, 8)
    for stream in (whole, *halves):
        stream.close()
    seen = [y for _, y in eval_stream(config, load_dataset("digits").test, batch_size=100)]
    assert [len(y) for y in seen] == [100, 100, 100, 100, 50]


def write_imagenet_folder(root: Path, per_class: int) -> None:
    """``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG`` of varied sizes, plus one corrupt file."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", 2)):
        for c, wnid in enumerate(("n01440764", "n01443537")):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = rng.integers(12, 40, 2)
                pixels = rng.integers(0, 60, (h, w, 3), dtype=np.uint8) + 150 * c
                Image.fromarray(pixels).save(folder / f"{wnid}_{i}.JPEG", quality=90)
    (root / "train" / "n01440764" / "n01440764_bad.JPEG").write_bytes(b"\xff\xd8\xff truncated")


def test_train_on_an_imagenet_layout_folder_skips_a_corrupt_image(tmp_path, tiny_model, caplog):
    write_imagenet_folder(tmp_path / "data", per_class=12)
    run_dir = tmp_path / "run"
    argv = ["train", "--recipe", "digits_vmoe", "--data", str(tmp_path / "data"), "--no-progress"]
    overrides = ["data.kind=folder", "train.steps=6", "train.batch_size=25", "train.eval_every=3"]
    code = main([*argv, "--run-dir", str(run_dir), "--set", *tiny_model, *overrides])
    assert code in (0, None)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["test_accuracy"] is not None
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # 25 files, batch 25: every step's batch holds the corrupt file once and skips it.
    skipped = [r["data/skipped_images"] for r in records if "data/skipped_images" in r]
    assert skipped and skipped[-1] == 6
    # Counted at every step, named in the log once.
    named = [r.getMessage() for r in caplog.records if "n01440764_bad.JPEG" in r.getMessage()]
    assert len(named) == 1 and named[0].startswith("skipped unreadable image: ")
    assert json.loads((run_dir / "classes.json").read_text()) == ["n01440764", "n01443537"]
