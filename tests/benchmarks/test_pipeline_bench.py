"""Smoke test of the input-pipeline benchmark in its tiny dry mode: structure, no timings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import pipeline  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_pipeline_benchmark_dry_run_writes_json_markdown_and_readme(tmp_path: Path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{pipeline.START}\nold\n{pipeline.END}\nafter\n", encoding="utf-8")
    assert pipeline.main(["--dry", "--out", str(tmp_path), "--update-readme", str(readme)]) == 0
    result = json.loads((tmp_path / "pipeline.json").read_text(encoding="utf-8"))
    assert set(result["images_per_s"]) == set(pipeline.CONTENDERS)
    for per_worker in result["images_per_s"].values():
        assert set(per_worker) == {"1", "2"}
        assert all(v["value"] > 0 for v in per_worker.values())
    targets = {row["metric"]: row["target"] for row in result["ratios"]}
    assert targets["crop_flip / plain images/s, 1 worker(s)"] == 0.9
    assert targets["crop_flip: 2 workers / 1 worker images/s"] == 1.6
    assert all(row["status"] in {"pass", "miss", "info"} for row in result["ratios"])
    text = readme.read_text(encoding="utf-8")
    assert "old" not in text and text.startswith("intro\n") and text.endswith("after\n")
    assert "| `crop_flip` |" in text and "| `crop_flip` |" in (tmp_path / "pipeline.md").read_text()
    # Re-rendering from the saved JSON gives the same README block.
    again = tmp_path / "README2.md"
    again.write_text(f"{pipeline.START}\n{pipeline.END}\n", encoding="utf-8")
    pipeline.main(["--from-json", str(tmp_path / "pipeline.json"), "--update-readme", str(again)])
    assert pipeline.render_table(result) in again.read_text(encoding="utf-8")
