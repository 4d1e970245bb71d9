"""Smoke tests of the benchmark harness on tiny shapes: structure only, no timing assertions.

The benchmark package lives at the repository root (not under ``src``); pytest's ``pythonpath``
setting in ``pyproject.toml`` makes it importable.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks import report, run, timing, update_readme
from benchmarks.timing import BenchConfig

NO_PEERS = ["layer", "bpr", "gemm", "memory", "model", "compile", "bounds"]


def tiny_config() -> BenchConfig:
    """T=64 tokens (2 x 32), D=16, F=32, one repeat, the debug V-MoE, eager compile backend."""
    return BenchConfig(
        images=2,
        tokens_per_image=32,
        dim=16,
        hidden=32,
        experts=8,
        repeats=1,
        warmup=1,
        threads=1,  # one thread: no thread-pool overhead on a busy test machine
        memory_repeats=1,
        soft_experts=4,
        soft_slots=1,
        model_name="vmoe_debug",
        model_batch=2,
        compile_backend="eager",
    )


@pytest.fixture(autouse=True)
def _restore_threads():
    """The harness sets torch's thread count; give the rest of the suite its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _check_rows(rows: list[dict]) -> None:
    for row in rows:
        assert set(row) >= {"id", "family", "metric", "value", "target", "status", "method"}
        assert row["status"] in {"pass", "miss", "info", "error"}, row
        if row["status"] == "error":
            assert row["error"], row
            continue
        value = row["value"]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, row
        if row["lo"] is not None:
            assert 0 < row["lo"] <= value <= row["hi"], row
        if row["status"] != "info":
            assert row["target"] in (f"{row['op']} {row['threshold']:g}",), row


def test_timing_helpers():
    calls = []
    samples = timing.compare({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert {k: len(v) for k, v in samples.items()} == {"a": 3, "b": 3}
    assert calls[:2] == ["a", "b"]  # warm-up, then rotated order per repeat
    assert calls[2:] == ["a", "b", "b", "a", "a", "b"]
    r = timing.paired_ratio([2.0, 4.0, 9.0], [1.0, 1.0, 3.0])
    assert r == {"value": 3.0, "lo": 2.0, "hi": 4.0}
    assert timing.ratio_record("x", "f", "m", 1.0, "<=", 1.15)["status"] == "pass"
    assert timing.ratio_record("x", "f", "m", 2.0, "<=", 1.15)["status"] == "miss"
    assert timing.ratio_record("x", "f", "m", 2.0, ">=", 1.5)["status"] == "pass"
    assert timing.ratio_record("x", "f", "m", 2.0, None, None)["status"] == "info"
    assert timing.ratio_record("x", "f", "m", None, ">=", 2, error="boom")["status"] == "error"
    stats = timing.summarize([3.0, 1.0, 2.0])
    assert (stats["median"], stats["min"], stats["max"]) == (2.0, 1.0, 3.0)


def test_all_families_tiny(tmp_path: Path):
    result = run.run_all(tiny_config(), NO_PEERS, log=lambda _msg: None)
    assert result["families"] == NO_PEERS
    assert set(result["results"]) == set(NO_PEERS)
    assert result["env"]["threads"] == 1 and result["env"]["torch"] == torch.__version__
    assert result["config"]["tokens"] == 64
    families = {row["family"] for row in result["ratios"]}
    assert families == set(NO_PEERS)
    _check_rows(result["ratios"])
    # Every family ran (no family-level failure rows).
    assert not any(row["id"].endswith(".failed") for row in result["ratios"]), result["errors"]
    # The allocator replay passed its known-allocation check, so it is the method used.
    assert result["results"]["memory"]["memory"]["method"].startswith("allocator peak")

    json_path, md_path = run.write_outputs(result, tmp_path)
    loaded = json.loads(json_path.read_text())
    assert loaded["ratios"] == result["ratios"]
    md = md_path.read_text()
    assert "| Metric | Measured | Spread | Target | Status |" in md
    for row in result["ratios"]:
        assert row["metric"] in md
    section = report.render_readme_section(loaded)
    assert "| Metric | Measured | Spread | Target | Status |" in section


def test_peers_tiny():
    for name in ("st_moe_pytorch", "mixture_of_experts", "soft_moe_pytorch"):
        pytest.importorskip(name)
    from benchmarks.peers import run_peers

    cfg = tiny_config()
    timing.set_threads(cfg.threads)
    out = run_peers(cfg)
    assert out["errors"] == {}
    ids = {row["id"] for row in out["ratios"]}
    for phase in ("fwd", "fwd_bwd"):
        assert f"peers.token_choice.{phase}" in ids
        assert f"peers.soft.{phase}" in ids
        assert f"peers.st_moe_pytorch.{phase}" in ids
        assert f"peers.mixture_of_experts.{phase}" in ids
    _check_rows(out["ratios"])
    assert all(row["status"] != "error" for row in out["ratios"])
    slots = out["results"]["token_choice.fwd"]["slots_per_expert_per_group"]
    peer_cf = out["results"]["token_choice.fwd"]["peer_capacity_factor"]
    # The peers' capacity formula int(S * cf / E) must land on our slot count.
    assert int(cfg.tokens_per_image * peer_cf / cfg.experts) == slots


def test_failed_family_is_recorded(monkeypatch):
    def broken(cfg):
        raise RuntimeError("no luck")

    monkeypatch.setitem(run.FAMILIES, "gemm", broken)
    result = run.run_all(tiny_config(), ["gemm"], log=lambda _msg: None)
    (row,) = result["ratios"]
    assert row["status"] == "error" and "no luck" in row["error"]
    assert "| error |" in report.render_markdown(result)


def test_update_readme_replaces_only_the_block(tmp_path: Path):
    result = {
        "env": {"cpu_model": "cpu", "torch": "x", "date": "d", "cpu_count": 2, "threads": 2},
        "config": {"threads": 2, "tokens": 64, "dim": 16, "hidden": 32, "experts": 8},
        "ratios": [timing.ratio_record("a.b", "layer", "Some ratio", 1.1, "<=", 1.15)],
    }
    json_path = tmp_path / "perf.json"
    json_path.write_text(json.dumps(result))
    readme = tmp_path / "README.md"
    readme.write_text(
        f"# T\n\nbefore\n{update_readme.START}\nold table\n{update_readme.END}\nafter\n"
    )
    update_readme.update_readme(json_path, readme)
    text = readme.read_text()
    assert "old table" not in text and "Some ratio" in text
    assert text.startswith("# T\n\nbefore\n") and text.endswith(f"{update_readme.END}\nafter\n")
    update_readme.update_readme(json_path, readme)
    assert readme.read_text() == text  # idempotent
    assert update_readme.main(["--json", str(json_path), "--readme", str(readme)]) == 0
    assert readme.read_text() == text
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        update_readme.update_readme(json_path, readme)


def test_cli_main_only_gemm(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setattr(run, "quick_config", lambda threads: tiny_config())
    code = run.main(
        ["--quick", "--only", "gemm", "--repeats", "1", "--threads", "1", "--out", str(tmp_path)]
    )
    assert code == 0
    assert (tmp_path / "perf.json").exists() and (tmp_path / "perf.md").exists()
    assert "Expert GEMM" in capsys.readouterr().out


def test_default_settings_are_vmoe_scale():
    from benchmarks.peers import peer_group_images

    cfg = BenchConfig()
    # 8 images of 197 tokens per routing group, E = 32, both precisions, E = 8 and 32 per layer.
    assert cfg.group_size == 8 * 197 and cfg.experts == 32
    assert cfg.layer_experts == (8, 32) and cfg.precisions == ("float32", "bfloat16")
    assert peer_group_images(cfg) == [1, 8]
    assert cfg.model_overrides["num_experts"] == 32
    with pytest.raises(ValueError, match="'float16'"):
        timing.precision("float16")


def test_profile_tiny(tmp_path: Path):
    from benchmarks.profile import BUCKETS, bucket

    assert bucket("aten::_grouped_mm") == "gemm" and bucket("aten::copy_") == "casts"
    assert bucket("aten::_fused_adamw_") == "optimizer" and bucket("aten::topk") == "routing"
    cfg = tiny_config()
    cfg.profile_steps = 1
    result = run.run_all(cfg, ["profile"], log=lambda _msg: None)
    assert result["errors"] == {}
    profiles = result["results"]["profile"]
    assert set(profiles) == {
        "layer_e32_top1_float32",
        "layer_e32_top1_bfloat16",
        "model_train_float32",
        "model_train_bfloat16",
    }
    for data in profiles.values():
        for ms in data["ms_per_step"].values():
            assert set(ms) == {*BUCKETS, "total", "page_faults", "plain_ms", "plain_page_faults"}
            assert ms["total"] > 0 and ms["plain_ms"] > 0
            assert ms["gemm"] > 0  # every contender multiplies matrices
    # The MoE layer holds E expert MLPs: E times the dense layer's parameters (top-1).
    layer = profiles["layer_e32_top1_float32"]["param_bytes_fp32"]
    assert layer["moe"] == 32 * layer["dense"]
    _, md_path = run.write_outputs(result, tmp_path)
    assert "## Where the time goes (torch.profiler)" in md_path.read_text()


def test_model_batch_option(capsys):
    assert run.build_config(run.parse_args(["--model-batch", "32"])).model_batch == 32
    assert run.build_config(run.parse_args([])).model_batch == BenchConfig().model_batch
    with pytest.raises(SystemExit):
        run.parse_args(["--model-batch", "0"])
    assert "--model-batch: must be a positive integer, got 0" in capsys.readouterr().err
