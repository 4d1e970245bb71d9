"""End to end on tiny stand-ins: convert a vmoe checkpoint, evaluate it on an ImageNet-layout
folder, fine-tune it with each transfer recipe from every kind of source."""

from __future__ import annotations

import json

import pytest

from visionmoe.cli.main import main
from visionmoe.convert import write_vmoe_checkpoint

# With the tiny architecture's model.* settings (conftest TINY_VMOE_SET), shrinks a transfer
# recipe onto the tiny checkpoint: same tree layout, 16-px fine-tuning from an 8-px checkpoint
# (the position embedding is resized), two steps on a folder dataset.
TRAIN_SHRINK = [
    "model.image_size=16",
    "model.group_images=2",
    "data.kind=folder",
    "train.steps=2",
    "train.batch_size=4",
    "train.eval_batch_size=4",
    "train.eval_every=2",
    "train.checkpoint_every=2",
    "train.log_every=1",
    "train.threads=1",
    "schedule.warmup_steps=1",
]
E3 = ["model.ensemble_members=2", "model.top_k=1", "model.representation_size=8"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, stand_ins):
    # ImageNet's layout: train/ with 4 images per class, val/ with 2 (so val is what is scored).
    root = tmp_path_factory.mktemp("imagenet") / "data"
    stand_ins.image_folder(root, splits=("train",), per_class=4, seed=1)
    stand_ins.image_folder(root, splits=("val",), per_class=2, seed=2)
    return root


@pytest.fixture(scope="module")
def shrink(stand_ins):
    return [*stand_ins.model_set, *TRAIN_SHRINK]


@pytest.fixture(scope="module")
def converted(vmoe_prefix, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "tiny"
    args = ["convert", "vmoe", str(vmoe_prefix), "--out", str(out)]
    assert main([*args, "--set", "eval_capacity_factor=2.0"]) == 0
    return out


def _eval_json(capsys, *args):
    assert main(["eval", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_convert_then_eval_on_an_imagenet_folder(converted, vmoe_prefix, folder, capsys):
    assert main(["eval", str(converted), "--data", str(folder), "--set", "data.kind=folder"]) == 0
    assert capsys.readouterr().out.startswith("accuracy ")
    result = _eval_json(capsys, str(converted), "--data", str(folder), "--set", "data.kind=folder")
    # 3 classes x 2 val images; the model is 8 px, so vmoe's rule is a square resize.
    assert result["num_examples"] == 6 and result["source_kind"] == "pretrained"
    assert result["preprocess"] == "resize(8)" and 0 <= result["accuracy"] <= 1
    # The prefix itself evaluates to the same numbers (same weights, same eval cf).
    direct = _eval_json(
        capsys, str(vmoe_prefix), "--data", str(folder), "--set", "model.eval_capacity_factor=2.0"
    )
    assert direct["source_kind"] == "vmoe" and direct["accuracy"] == result["accuracy"]
    assert direct["loss"] == pytest.approx(result["loss"], abs=1e-6)


def test_eval_resolution_batch_size_and_preprocessing_options(converted, folder, capsys):
    base = [str(converted), "--data", str(folder), "--batch-size", "4"]
    at16 = _eval_json(capsys, *base, "--image-size", "16")
    assert at16["image_size"] == 16 and at16["preprocess"] == "resize(16)"
    cropped = _eval_json(capsys, *base, "--set", "preprocess.resize_small=10")
    assert cropped["preprocess"] == "resize_small(10) | central_crop(8)"
    assert main(["eval", *base, "--set", "preprocess.resize_small=4"]) == 2
    assert "preprocess.resize_small" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("recipe", "extra"),
    [
        ("vmoe_s32_ilsvrc2012_ft384", {"pre_logits": 8}),
        ("vmoe_b16_cifar10_ft128", {}),
        ("eee_s32_cifar100_ft128", {"pre_logits": 8, "members": 2}),
    ],
)
def test_transfer_recipes_fine_tune_a_tiny_stand_in(
    recipe, extra, folder, shrink, stand_ins, tmp_path
):
    prefix = tmp_path / "upstream" / "ckpt"
    write_vmoe_checkpoint(prefix, stand_ins.tree(seed=3, classes=5, **extra), num_shards=2)
    shrink = [*shrink, *(E3 if "members" in extra else [])]
    run = tmp_path / "run"
    args = ["train", "--recipe", recipe, "--init", str(prefix), "--data", str(folder)]
    assert main([*args, "--run-dir", str(run), "--no-progress", "--set", *shrink]) == 0
    summary = json.loads((run / "summary.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert summary["steps"] == 2 and summary["init"] == str(prefix)
    # The recipe's released settings survive the shrinking overrides.
    assert config["optim"]["name"] == "sgd" and config["optim"]["grad_clip"] == 10.0
    assert config["model"]["moe"]["capacity_factor"] == 1.5
    # PIPELINE.md section 1: inception crop + flip to train, a square resize to evaluate.
    pp = config["preprocess"]
    assert pp["inception_crop"] and pp["flip"] and pp["eval_resize_small"] is None
    assert pp["randaug_layers"] == 0 and pp["mixup_concentration"] == 0.0
    assert config["model"]["num_classes"] == 3  # the folder's classes: a new head
    assert any("head" in note for note in summary["init_notes"])
    assert any("position embedding" in note for note in summary["init_notes"])


def test_fine_tune_from_a_pretrained_folder_and_from_a_run(
    converted, folder, shrink, tmp_path, capsys
):
    recipe = ["train", "--recipe", "vmoe_b16_cifar10_ft128", "--data", str(folder)]
    first, second = tmp_path / "first", tmp_path / "second"
    for source, run in ((converted, first), (first, second)):
        args = [*recipe, "--init", str(source), "--run-dir", str(run), "--no-progress"]
        assert main([*args, "--set", *shrink]) == 0
        assert json.loads((run / "summary.json").read_text())["init"] == str(source)
    assert "test accuracy" in capsys.readouterr().out


def test_a_corrupt_vmoe_prefix_is_one_line_naming_the_file(tmp_path, folder, capsys):
    prefix = tmp_path / "broken"
    (tmp_path / "broken.index").write_bytes(b"\x00not msgpack")
    for command in (["eval", str(prefix), "--data", str(folder)], ["upcycle", str(prefix)]):
        extra = ["--out", str(tmp_path / "o")] if command[0] == "upcycle" else []
        assert main([*command, *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "broken" in err
        assert err.startswith(f"visionmoe {command[0]}: error:")


def test_sweep_fewshot_inspect_and_predict_take_a_converted_model(
    converted, vmoe_prefix, folder, tmp_path, capsys
):
    data = ["--data", str(folder), "--batch-size", "3"]
    sweep = ["sweep", str(vmoe_prefix), *data, "--capacity-factors", "0.5", "4"]
    assert main([*sweep, "--out", str(tmp_path / "sweep")]) == 0
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["rows"]
    # At cf 4 nothing is dropped, so BPR and vanilla routing agree exactly.
    assert rows[1]["bpr_accuracy"] == rows[1]["vanilla_accuracy"]
    assert main(["fewshot", str(converted), *data, "--shots", "1", "2"]) == 0
    assert "1-shot" in capsys.readouterr().out
    out = tmp_path / "inspect"
    assert main(["inspect", str(converted), *data, "--out", str(out), "--examples", "2"]) == 0
    assert (out / "report.html").is_file()
    capsys.readouterr()
    image = next((folder / "val" / "class_1").iterdir())
    assert main(["predict", str(converted), str(image)]) == 0
    assert capsys.readouterr().out.startswith(f"{image}: ")
