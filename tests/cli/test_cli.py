"""The command line on a tiny trained run: every command, as a user would type it."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionmoe.cli.main import main

FASHION = Path(__file__).resolve().parents[3] / "shared" / "data" / "fashion_mnist.npz"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    # digits_tiny learns in seconds (150 steps), so the checks below see a model that works.
    out = tmp_path_factory.mktemp("runs") / "tiny"
    argv = ["train", "--recipe", "digits_tiny", "--no-progress", "--run-dir", str(out)]
    assert main([*argv, "--set", "train.threads=1"]) == 0
    return out


def test_train_writes_the_run_directory_and_learns(run_dir, capsys):
    for name in ("config.json", "metrics.jsonl", "summary.json", "classes.json"):
        assert (run_dir / name).is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    # Chance is 0.1; the recipe reaches 0.889 with seed 0 (450 test digits).
    assert summary["steps"] == 150 and summary["test_accuracy"] >= 0.8
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_0000150"


def test_eval_reports_accuracy_and_compute(run_dir, capsys):
    assert main(["eval", str(run_dir), "--json"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert full["compute_frac"] == pytest.approx(1.0)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert full["accuracy"] == pytest.approx(summary["test_accuracy"]) and full["accuracy"] >= 0.8
    assert (
        main(["eval", str(run_dir), "--capacity-factor", "0.25", "--batch-priority", "--json"]) == 0
    )
    reduced = json.loads(capsys.readouterr().out)
    assert reduced["compute_frac"] < 0.5
    assert main(["eval", str(run_dir), "--top-k", "1"]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_sweep_writes_table_json_and_plot(run_dir, tmp_path, capsys):
    assert (
        main(
            [
                "sweep",
                str(run_dir),
                "--capacity-factors",
                "0.25",
                "4",
                "--out",
                str(tmp_path),
                "--orders",
                "2",
            ]
        )
        == 0
    )
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    rows = sweep["rows"]
    assert [r["capacity_factor"] for r in rows] == [0.25, 4.0] and sweep["orders"] == 2
    # At cf=4 nothing is dropped, so BPR and vanilla agree exactly.
    assert rows[1]["bpr_accuracy"] == rows[1]["vanilla_accuracy"]
    assert rows[1]["bpr_compute_frac"] == pytest.approx(1.0)
    Image.open(tmp_path / "sweep.png").verify()
    out = capsys.readouterr().out
    assert "| capacity factor |" in out
    n = sweep["num_examples"]
    assert n > 0 and f"{n} test examples (one example = {100 / n:.2f} accuracy points)" in out


def test_fewshot_reports_each_shot(run_dir, capsys):
    assert main(["fewshot", str(run_dir), "--shots", "1", "5", "10", "25"]) == 0
    out = capsys.readouterr().out
    for shot in (1, 5, 10, 25):
        assert f"{shot}-shot" in out


def test_inspect_writes_report(run_dir, tmp_path, capsys):
    assert main(["inspect", str(run_dir), "--out", str(tmp_path), "--examples", "4"]) == 0
    html = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in html and "http://" not in html
    assert list(tmp_path.glob("class_expert_layer*.png"))


def test_predict_top5(run_dir, tmp_path, capsys):
    path = tmp_path / "digit.png"
    Image.fromarray((np.random.default_rng(0).random((8, 8)) * 255).astype(np.uint8)).save(path)
    assert main(["predict", str(run_dir), str(path)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(str(path)) and line.count(",") == 4


def test_listing_commands(capsys):
    assert main(["models", "*debug"]) == 0
    assert "vmoe_debug" in capsys.readouterr().out
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in (
        "digits_vmoe",
        "digits_vit",
        "fashion_mnist_vmoe",
        "fashion_mnist_vit",
        "cifar10_vmoe",
    ):
        assert name in out


def test_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["train", "--recipe", "fashion_mnist_vmoe"]) == 2
    assert "needs a dataset path" in capsys.readouterr().err
    assert main(["train", "--recipe", "fashion_mnist_vmoe", "--data", str(tmp_path / "x.npz")]) == 2
    assert "x.npz" in capsys.readouterr().err
    assert main(["train", "--set", "model.num_expert=2"]) == 2
    assert "model.num_experts" in capsys.readouterr().err


@pytest.mark.skipif(not FASHION.exists(), reason="shared Fashion-MNIST file not present")
def test_fashion_mnist_recipe_trains_on_the_given_path(tmp_path, capsys):
    args = [
        "train",
        "--recipe",
        "fashion_mnist_vmoe",
        "--data",
        str(FASHION),
        "--no-progress",
        "--run-dir",
        str(tmp_path / "fm"),
        "--set",
        "train.steps=3",
        "data.max_train_examples=256",
        "train.eval_every=100",
        "train.threads=1",
    ]
    assert main(args) == 0
    summary = json.loads((tmp_path / "fm" / "summary.json").read_text())
    assert summary["dataset"] and summary["steps"] == 3


def test_commands_work_beside_a_users_own_configs_package(tmp_path):
    # A user's project often has a `configs/` package; with the working directory first on
    # sys.path (python -c / -m) it must not shadow the recipes.
    package = tmp_path / "configs"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('the user configs package')\n")
    run = "import sys; from visionmoe.cli.main import main; sys.exit(main(sys.argv[1:]))"
    listing = subprocess.run(
        [sys.executable, "-c", run, "recipes"], cwd=tmp_path, capture_output=True, text=True
    )
    assert listing.returncode == 0, listing.stderr
    assert "digits_vmoe" in listing.stdout
    args = ["train", "--recipe", "digits_tiny", "--no-progress", "--run-dir", "run"]
    args += ["--set", "train.steps=5", "train.threads=1"]
    train = subprocess.run(
        [sys.executable, "-c", run, *args], cwd=tmp_path, capture_output=True, text=True
    )
    assert train.returncode == 0, train.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 5
