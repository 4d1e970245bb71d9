"""Bad invocations: each is one line ``visionmoe <cmd>: error: ...`` naming the bad value."""

import pytest

from visionmoe.cli.main import main

TINY_RUN = [
    "model.hidden_size=16",
    "model.mlp_dim=32",
    "model.num_heads=2",
    "model.num_layers=2",
    "model.moe_layers=1",
    "model.num_experts=4",
    "train.threads=1",
    "train.steps=2",
    "train.batch_size=16",
    "data.max_train_examples=64",
    "train.eval_every=100",
    "train.checkpoint_every=2",
    "schedule.warmup_steps=1",
]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    run = root / "run"
    assert main(["train", "--no-progress", "--run-dir", str(run), "--set", *TINY_RUN]) == 0
    (root / "junk.bin").write_bytes(b"not a checkpoint")
    (root / "junk.safetensors").write_bytes(b"not a checkpoint")
    (root / "junk.png").write_bytes(b"not an image")
    return {"run": str(run), "root": str(root), "missing": str(root / "missing")}


# (argv with {run}/{root}/{missing} placeholders, command in the message, text naming the value)
BAD = [
    (["trian"], "", "'trian'"),
    (["train", "--set", "model.num_expert=2"], "train", "model.num_expert"),
    (["train", "--set", "train.threads=-2"], "train", "-2"),
    (["train", "--set", "model.capacity_factor=inf"], "train", "inf"),
    (["train", "--set", "model.noise_std=nan"], "train", "nan"),
    (["train", "--set", "model.batch_priority=maybe"], "train", "'maybe'"),
    (["train", "--set", "train.steps=0"], "train", "train.steps"),
    (["train", "--set", "model.router=sparse"], "train", "'sparse'"),
    (["train", "--set", "nodot=1"], "train", "'nodot=1'"),
    (["train", "--set", "bogus.x=1"], "train", "'bogus'"),
    (["train", "--recipe", "no_such_recipe"], "train", "'no_such_recipe'"),
    (["train", "--set", "model.top_k=9"], "train", "top_k=9"),
    (["train", "--set", "optim.lr=-1"], "train", "-1"),
    (["train", "--set", "optim.name=adam"], "train", "'adam'"),
    (["train", "--set", "model.num_experts=0"], "train", "got 0"),
    (["train", "--set", "data.kind=imagenet"], "train", "'imagenet'"),
    (["train", "--set", "train.steps=many"], "train", "'many'"),
    (["train", "--set", "train.keep_checkpoints=-1"], "train", "-1"),
    (["train", "--set", "optim.momentum=1"], "train", "optim.momentum"),
    (["train", "--init", "{missing}"], "train", "{missing}"),
    (["train", "--recipe", "fashion_mnist_vmoe", "--data", "{missing}.npz"], "train", "{missing}"),
    (["eval", "{missing}"], "eval", "{missing}"),
    (["eval"], "eval", "SOURCE"),
    (["eval", "{run}", "--capacity-factor", "inf"], "eval", "inf"),
    (["eval", "{run}", "--capacity-factor", "0"], "eval", "0.0"),
    (["eval", "{run}", "--capacity-factor", "abc"], "eval", "'abc'"),
    (["eval", "{run}", "--top-k", "0"], "eval", "got 0"),
    (["eval", "{run}", "--top-k", "99"], "eval", "99"),
    (["sweep", "{run}", "--capacity-factors", "-1"], "sweep", "-1"),
    (["sweep", "{run}", "--orders", "0"], "sweep", "got 0"),
    (["sweep", "{missing}"], "sweep", "{missing}"),
    (["fewshot", "{run}", "--shots", "0"], "fewshot", "got 0"),
    (["fewshot", "{run}", "--protocol", "x"], "fewshot", "'x'"),
    (["fewshot", "{run}", "--dataset", "nope"], "fewshot", "'nope'"),
    (["zeroshot", "{run}"], "zeroshot", "{run}"),
    (["inspect", "{run}", "--examples", "0"], "inspect", "got 0"),
    (["inspect", "{missing}"], "inspect", "{missing}"),
    (["predict", "{run}", "{missing}.png"], "predict", "{missing}.png"),
    (["predict", "{run}", "{root}/junk.png"], "predict", "junk.png"),
    (["convert", "dense", "{root}/junk.bin", "--out", "{root}/o"], "convert", "junk.bin"),
    (["convert", "dense", "{root}/junk.safetensors", "--out", "{root}/o"], "convert", "junk"),
    (["convert", "dense", "{missing}", "--out", "{root}/o"], "convert", "{missing}"),
    (["convert", "dense", "{root}/junk.bin", "--out", "o", "--format", "odd"], "convert", "odd"),
    (["convert", "vmoe", "{missing}", "--out", "{root}/o"], "convert", "{missing}"),
    (["convert", "bogus", "x", "--out", "{root}/o"], "convert", "'bogus'"),
    (["upcycle", "{missing}", "--out", "{root}/o"], "upcycle", "{missing}"),
    (["upcycle", "{run}", "--out", "{root}/o"], "upcycle", "MoE"),
    (["models", "--bogus"], "", "--bogus"),
]


def test_at_least_25_distinct_bad_invocations():
    assert len({tuple(argv) for argv, _, _ in BAD}) >= 25


@pytest.mark.parametrize(("argv", "command", "names"), BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_invocation_is_one_error_line(paths, capsys, argv, command, names):
    argv = [a.format(**paths) for a in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    prefix = f"visionmoe {command}: error: " if command else "visionmoe: error: "
    assert len(lines) == 1 and lines[0].startswith(prefix), captured.err
    assert names.format(**paths) in lines[0]
    assert "Traceback" not in captured.err + captured.out


def test_unexpected_exceptions_are_one_line_too(monkeypatch, capsys):
    # Any library error (not only ValueError) reaches the user as one line with its type.
    from visionmoe.cli import main as cli

    def boom(args):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setitem(cli.COMMANDS, "models", boom)
    assert main(["models"]) == 2
    assert capsys.readouterr().err == "visionmoe models: error: RuntimeError: boom second line\n"
