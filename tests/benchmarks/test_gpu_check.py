"""The GPU check script in its CPU dry-run mode: it trains both models and finds no host syncs."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import gpu_check  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_dry_run_trains_moe_and_dense_twin_without_host_syncs(tmp_path):
    out = tmp_path / "gpu_check.json"
    report = gpu_check.main(["--dry-run", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    assert report["mode"] == "dry-run (CPU)"
    moe, dense = report["results"]
    assert (moe["model"], dense["model"]) == ("moe", "dense")
    # The dense twin has the same active FLOPs: it replaces experts by one wider MLP, so it has
    # fewer parameters than the MoE (E=4 experts of width F vs one MLP of width K*F=2F).
    assert dense["params_m"] < moe["params_m"]
    for result in (moe, dense):
        assert result["steps"] == 6
        assert result["host_syncs_between_log_steps"] == {}
        assert result["images_per_s"] > 0 and result["peak_memory_mb"] > 0
        assert len(result["loss_first_last"]) == 2
    assert report["no_host_syncs"] is True
    assert report["moe_over_dense_step_time"] > 0


def test_without_cuda_the_full_check_refuses_to_run(monkeypatch):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        gpu_check.main(["--out", ""])
