"""The BPR vs vanilla study: one tiny run end to end, its cache, and the verdict column."""

import json

from benchmarks.quality import bpr_digits

TINY_SCHEDULE = [
    "data.max_train_examples=256",
    "train.batch_size=32",
    "train.steps=10",
    "train.eval_every=10",
    "train.checkpoint_every=10",
    "train.log_every=5",
    "schedule.warmup_steps=2",
]


def test_tiny_run_is_measured_cached_and_tabled(tmp_path, monkeypatch, tiny_model):
    monkeypatch.setattr(
        bpr_digits, "VARIANTS", {"tiny": ("tiny digits V-MoE", [*tiny_model, *TINY_SCHEDULE])}
    )
    monkeypatch.setattr(bpr_digits, "CAPACITY_FACTORS", (0.25, 4.0))
    out = tmp_path / "out"
    bpr_digits.main(
        ["--seeds", "0", "--orders", "2", "--run-root", str(tmp_path), "--out", str(out)]
    )
    result = json.loads((out / "bpr_digits.json").read_text())["runs"][0]
    assert result["variant"] == "tiny" and result["seed"] == 0
    # Nothing is dropped at cf 4, so both routings give the same accuracy.
    assert abs(result["bpr_minus_vanilla_points"]["4.0"]) < 1e-9
    assert abs(result["dataset_order_bpr_minus_vanilla_points"]["4.0"]) < 1e-9
    assert (tmp_path / "tiny-s0" / "bpr_study.json").exists()
    assert "| tiny digits V-MoE | 0 |" in (out / "bpr_digits.md").read_text()

    # A second call reuses the run and its measurements instead of training again.
    def fail(*args, **kwargs):
        raise AssertionError("should have been cached")

    monkeypatch.setattr(bpr_digits, "run_training", fail)
    monkeypatch.setattr(bpr_digits, "sweep_run", fail)
    assert bpr_digits.run_one("tiny", 0, tmp_path, 2) == result


def test_verdict_counts_seeds_with_no_negative_gap(monkeypatch):
    monkeypatch.setattr(bpr_digits, "VARIANTS", {"v": ("variant", [])})
    monkeypatch.setattr(bpr_digits, "CAPACITY_FACTORS", (0.5, 0.75, 4.0))

    def record(seed, gaps):
        points = dict(zip(("0.5", "0.75", "4.0"), gaps, strict=True))
        return {
            "variant": "v",
            "seed": seed,
            "test_accuracy": 0.9,
            "second_choice_points": 0.0,
            "bpr_minus_vanilla_points": points,
            "dataset_order_bpr_minus_vanilla_points": points,
        }

    # Seed 1 is below vanilla at cf 0.75; a float-rounding zero still counts as a tie.
    text = bpr_digits.table([record(0, (0.4, -1e-14, 0.0)), record(1, (0.2, -0.22, 0.0))], 5)
    rows = [line for line in text.splitlines() if line.startswith("| variant | 0, 1 |")]
    assert len(rows) == 2 and all(row.endswith("| 1/2 |") for row in rows)
