"""Expert-parallel + data-parallel training on gloo/loopback (several processes per test).

The processes share 2 CPU cores, so models are the debug ones, runs are a few steps long, and two
2-rank training runs (module fixtures: dense part under DDP, and under FSDP2 with DCP
checkpoints) serve the checkpoint, re-sharding and resume tests.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from visionmoe.distributed import (
    ShardedReader,
    export_merged,
    gather_checkpoint,
    load_sharded,
    read_layout,
)
from visionmoe.distributed.train import check_layout
from visionmoe.eval.classify import evaluate_run
from visionmoe.train.checkpoint import load_checkpoint

ATOL = 1e-5

TRAIN_ARGS = [
    "--recipe",
    "digits_vmoe",  # E=8, K=2, router noise on, 8 images per routing group
    "--set",
    "train.steps=4",
    "train.batch_size=16",
    "train.checkpoint_every=2",
    "train.eval_every=1000",
    "train.log_every=1",
    "train.threads=1",
    "train.eval_batch_size=512",
    "--no-progress",
]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, launcher):
    """A 4-step, 2-rank run with the dense part under FSDP2 (DCP checkpoints at steps 2 and 4)
    and no merged checkpoint at the end."""
    root = tmp_path_factory.mktemp("fsdp_run")
    run = root / "run"
    args = [*TRAIN_ARGS, "--set", "parallel.dense=fsdp", "parallel.merged_checkpoint=false"]
    launcher.check_ok(launcher.run_train([*args, "--run-dir", str(run)], 2, root / "logs"))
    return run


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, launcher):
    """A 4-step, 2-rank run with sharded checkpoints at steps 2 and 4 and a merged final one."""
    root = tmp_path_factory.mktemp("two_rank_run")
    run = root / "run"
    launcher.check_ok(launcher.run_train([*TRAIN_ARGS, "--run-dir", str(run)], 2, root / "logs"))
    return run


def _check_equivalence(report: dict, rank: int, world_size: int) -> None:
    # Each case with the dense part under DDP and under FSDP2.
    # top_k_ep2 (4 ranks): 2 expert-parallel groups of 2, experts replicated twice;
    # top_k_ep1 (2 ranks): experts replicated on every rank (plain data parallelism).
    # top_k_accum2: grad_accum=2, gradient sync on the last micro-batch only.
    names = {"top_k", "bpr", "expert_choice", "soft", f"top_k_ep{world_size // 2}", "top_k_accum2"}
    cases = {f"{dense}/{name}" for dense in ("ddp", "fsdp") for name in names}
    assert cases <= set(report)
    for case in cases:
        diffs = report[case]
        for key in ("logits", "train/loss", "train/aux_loss", "grads", "weights"):
            assert diffs[key] < ATOL, (rank, case, key, diffs[key])
        assert diffs["train/grad_norm"] < ATOL * max(1.0, diffs["grad_norm"])
        # DDP keeps whole dense weights; FSDP2 holds them as DTensor shards.
        assert (diffs["dtensor_params"] > 0) == case.startswith("fsdp/"), (case, diffs)
    # The cases exercise what they claim: capacity drops tokens, the aux loss is on, clipping
    # at 0.05 is active.
    for dense in ("ddp", "fsdp"):
        assert report[f"{dense}/top_k"]["ref_dropped_frac"] > 0.1
        assert report[f"{dense}/bpr"]["ref_dropped_frac"] > 0.1
        assert report[f"{dense}/top_k"]["aux_loss"] > 0
        assert report[f"{dense}/top_k"]["grad_norm"] > 0.05


def test_two_ranks_match_single_process(launcher, tmp_path):
    """Loss, outputs, gradients and updated weights (2 steps) equal one process on the batch."""
    launcher.check_ok(launcher.run_workers(["equivalence", "--out", str(tmp_path)], 2, tmp_path))
    for rank in range(2):
        _check_equivalence(json.loads((tmp_path / f"rank{rank}.json").read_text()), rank, 2)


def test_four_ranks_match_single_process_and_load_a_two_rank_checkpoint(
    launcher, tmp_path, two_rank_run, fsdp_run
):
    """Same at 4 ranks (one launch also re-shards the 2-rank checkpoints to 2 experts/rank)."""
    args = ["equivalence", "--out", str(tmp_path), "--run", str(two_rank_run)]
    args += ["--fsdp-run", str(fsdp_run)]
    launcher.check_ok(launcher.run_workers(args, 4, tmp_path))
    for rank in range(4):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        _check_equivalence(report, rank, 4)
        reshard = report["reshard"]
        assert reshard["local_experts"] == 2
        assert reshard["sharded_vs_full"] < ATOL, (rank, reshard)
        assert reshard["merged_vs_full"] == 0.0, (rank, reshard)
        # The 2-rank FSDP2 run's DCP checkpoint restored into 4 ranks' shards, exactly.
        fsdp = report["fsdp_reshard"]
        assert fsdp["local_experts"] == 2
        assert fsdp["weights"] == fsdp["exp_avg"] == fsdp["step"] == 0.0, (rank, fsdp)


def test_two_rank_checkpoint_loads_in_one_process(two_rank_run):
    layout = read_layout(two_rank_run)
    assert (layout["step"], layout["world_size"], layout["expert_parallel"]) == (4, 2, 2)
    assert layout["experts"]["blocks.1.ffn.experts"]["ranges"] == [[0, 4], [4, 8]]
    assert load_sharded(two_rank_run, 2, 1)["blocks.1.ffn.experts.w1"].shape[0] == 4
    # The merged standard checkpoint equals the gathered shards, bit for bit, and resumes.
    merged = load_checkpoint(two_rank_run, with_optimizer=True)
    gathered = gather_checkpoint(two_rank_run)
    assert merged["meta"]["step"] == 4
    assert set(merged["model"]) == set(gathered)
    for key, value in gathered.items():
        assert torch.equal(merged["model"][key], value), key
    # `visionmoe eval RUN` reads it unchanged, and agrees with the replicated evaluation.
    summary = json.loads((two_rank_run / "summary.json").read_text())
    assert summary["world_size"] == 2
    result = evaluate_run(str(two_rank_run))
    assert result["accuracy"] == summary["test_accuracy"]
    assert result["loss"] == pytest.approx(summary["test_loss"], abs=1e-5)
    with pytest.raises(ValueError, match="8 experts cannot be split evenly over 3"):
        load_sharded(two_rank_run, 3, 0)


def test_resume_from_sharded_checkpoint_is_exact(launcher, tmp_path, two_rank_run):
    """Resuming at step 2 (same layout: RNG streams restored) ends where the run ended."""
    resumed = tmp_path / "resumed"
    shutil.copytree(two_rank_run, resumed)
    shutil.rmtree(resumed / "sharded" / "step_0000004")
    (resumed / "sharded" / "latest").write_text("step_0000002")
    shutil.rmtree(resumed / "checkpoints")
    launcher.check_ok(
        launcher.run_train(["--resume", str(resumed), "--no-progress"], 2, tmp_path / "logs")
    )
    expected = load_checkpoint(two_rank_run)["model"]
    again = load_checkpoint(resumed)["model"]
    for key, value in expected.items():
        assert torch.equal(again[key], value), key
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == sorted(steps) and steps.count(3) == 1


def test_fsdp_run_writes_dcp_and_exports_on_request(fsdp_run, tmp_path):
    layout = read_layout(fsdp_run)
    assert layout["format"] == "visionmoe-dcp-v1"
    assert (layout["step"], layout["world_size"], layout["expert_parallel"]) == (4, 2, 2)
    assert (fsdp_run / "sharded" / "step_0000004" / ".metadata").is_file()
    # Merged checkpoint off: the summary points at the sharded one and none was written.
    summary = json.loads((fsdp_run / "summary.json").read_text())
    assert summary["dense"] == "fsdp"
    assert summary["checkpoint"] == layout["path"]
    assert not (fsdp_run / "checkpoints").exists()
    # Global shapes in one process: all 8 experts, the whole dense part.
    reader = ShardedReader(fsdp_run)
    specs = reader.specs()
    assert specs["model/blocks.1.ffn.experts.w1"][1][0] == 8
    assert specs["optim/blocks.1.ffn.experts.w1/exp_avg"][1][0] == 8
    gathered = gather_checkpoint(fsdp_run)
    assert sum(v.numel() for v in gathered.values()) >= summary["num_params"]
    # The export, written later, is the standard checkpoint `visionmoe eval RUN` reads, and
    # evaluating it in one process gives the sharded evaluation's accuracy.
    export = tmp_path / "export"
    shutil.copytree(fsdp_run, export)
    export_merged(export)
    merged = load_checkpoint(export, with_optimizer=True)
    assert merged["meta"]["step"] == 4
    for key, value in gathered.items():
        assert torch.equal(merged["model"][key], value), key
    assert torch.equal(merged["rng"], reader.rng(0))
    result = evaluate_run(str(export))
    assert result["accuracy"] == summary["test_accuracy"]


def test_fsdp_resume_from_dcp_checkpoint_is_exact(launcher, tmp_path, fsdp_run):
    """Resuming at step 2 (DCP load into the FSDP2 shards + optimizer state) ends where the
    uninterrupted run ended, bit for bit."""
    resumed = tmp_path / "resumed"
    shutil.copytree(fsdp_run, resumed)
    shutil.rmtree(resumed / "sharded" / "step_0000004")
    (resumed / "sharded" / "latest").write_text("step_0000002")
    launcher.check_ok(
        launcher.run_train(["--resume", str(resumed), "--no-progress"], 2, tmp_path / "logs")
    )
    expected = ShardedReader(fsdp_run)
    again = ShardedReader(resumed)
    assert again.layout["step"] == 4
    for key in expected.specs():
        assert torch.equal(again.read(key), expected.read(key)), key


def test_refuses_layouts_before_any_work(launcher, tmp_path):
    from visionmoe.recipes import get_recipe
    from visionmoe.train.config import apply_set

    config = get_recipe("digits_vmoe")  # 8 experts, batch 64
    with pytest.raises(ValueError, match="8 experts.*3 expert-parallel"):
        check_layout(apply_set(config, ["train.batch_size=63"]), 3, None)
    with pytest.raises(ValueError, match="batch_size=64 .* world size 3"):
        check_layout(config, 3, None)
    with pytest.raises(ValueError, match="expert parallelism 3 must divide the world size 4"):
        check_layout(config, 4, 3)
    with pytest.raises(ValueError, match=r"grad_accum=16 must divide .* \(64 / 8 = 8 images\)"):
        check_layout(apply_set(config, ["train.grad_accum=16"]), 8, None)
    notes = check_layout(apply_set(config, ["model.group_images=16"]), 8, None)
    assert notes and "routing differs" in notes[0]
    # The entry point refuses before joining the group: a lone rank of 3 exits at once.
    result = subprocess.run(
        [sys.executable, "-m", "visionmoe.distributed.train", "--set", "train.batch_size=63"],
        env=launcher.rank_env(0, 3, 1),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "8 experts cannot be split evenly over 3" in result.stderr


@pytest.mark.parametrize("kind", ["exit", "hang"])
def test_failed_rank_stops_the_others(launcher, tmp_path, kind):
    """Rank 1 dies (or hangs) at step 1: rank 0 exits non-zero within the collective timeout."""
    timeout = 10
    args = ["fault", "--kind", kind, "--out", str(tmp_path), "--"]
    train = [*TRAIN_ARGS, "--run-dir", str(tmp_path / "run"), "--timeout", str(timeout)]
    # After the first failure the other rank gets `grace` seconds: the full timeout when rank 1
    # died (rank 0 must notice by itself), 1 s once rank 0 has failed and rank 1 merely sleeps.
    grace = 1 if kind == "hang" else timeout + 10
    results = launcher.run_workers(args + train, 2, tmp_path, timeout=120, grace=grace)
    assert (tmp_path / "fault_time").exists(), results[1].output[-3000:]
    rank0 = results[0]
    assert rank0.returncode not in (0, None), rank0.output[-3000:]
    if kind == "exit":
        assert results[1].returncode == 3
    else:
        assert "Timed out" in rank0.output, rank0.output[-3000:]
        assert results[1].returncode is None  # still asleep when the harness killed it
    # From the fault to rank 0's exit: bounded by the timeout (plus process teardown).
    fault_at = float((tmp_path / "fault_time").read_text())
    assert rank0.ended - fault_at < timeout + 10, rank0.output[-3000:]
