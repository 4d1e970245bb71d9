"""--device and --precision on the command line (CPU here; CUDA paths are guarded)."""

import json

import pytest
import torch

from visionmoe.cli.main import main

TINY = ["--recipe", "digits_tiny", "--no-progress", "--set", "train.threads=1", "train.steps=20"]


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "bf16"
    assert (
        main(["train", *TINY, "--run-dir", str(out), "--device", "cpu", "--precision", "bf16"]) == 0
    )
    return out


def test_train_records_device_and_precision(bf16_run):
    train = json.loads((bf16_run / "config.json").read_text())["train"]
    assert (train["device"], train["precision"]) == ("cpu", "bf16")
    logged = [json.loads(x) for x in (bf16_run / "metrics.jsonl").read_text().splitlines()]
    assert any("train/peak_memory_mb" in x for x in logged)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_without_cuda_is_a_one_line_error(tmp_path, capsys):
    code = main(["train", *TINY, "--run-dir", str(tmp_path / "x"), "--device", "cuda"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith("visionmoe train: error:") and "CUDA is not available" in err
    assert not (tmp_path / "x").exists()


def test_bad_precision_is_a_usage_error(capsys):
    assert main(["train", "--precision", "fp16"]) == 2
    assert "fp16" in capsys.readouterr().err


def test_resume_may_change_only_the_device(bf16_run, capsys):
    code = main(["train", "--resume", str(bf16_run), "--precision", "fp32"])
    assert code == 2 and "only --device may change" in capsys.readouterr().err


def test_eval_and_other_commands_take_device_and_precision(bf16_run, tmp_path, capsys):
    argv = ["--device", "cpu", "--precision", "bf16"]
    assert main(["eval", str(bf16_run), *argv, "--batch-size", "64", "--json"]) == 0
    bf16 = json.loads(capsys.readouterr().out)
    assert main(["eval", str(bf16_run), "--device", "cpu", "--json"]) == 0
    fp32 = json.loads(capsys.readouterr().out)
    # bf16 rounding may flip a few of the 450 test digits, no more.
    assert abs(bf16["accuracy"] - fp32["accuracy"]) <= 5 / 450
    assert bf16["num_examples"] == fp32["num_examples"] == 450
    out = tmp_path / "sweep"
    assert main(["sweep", str(bf16_run), *argv, "--capacity-factors", "1", "--out", str(out)]) == 0
    assert main(["fewshot", str(bf16_run), *argv, "--shots", "1"]) == 0
    assert main(["inspect", str(bf16_run), *argv, "--out", str(tmp_path / "inspect")]) == 0
    assert (tmp_path / "inspect" / "report.html").is_file()
    capsys.readouterr()
    assert main(["eval", str(bf16_run), "--precision", "fp16"]) == 2
    assert "invalid choice: 'fp16'" in capsys.readouterr().err
