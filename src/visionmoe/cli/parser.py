"""The ``visionmoe`` argument parser: subcommands, their options and examples."""

from __future__ import annotations

import argparse
from typing import NoReturn

EXAMPLES = {
    "train": "visionmoe train\n  visionmoe train --recipe digits_vit --set train.steps=500\n"
    "  visionmoe train --recipe fashion_mnist_vmoe --data ../shared/data/fashion_mnist.npz\n"
    "  visionmoe train --resume runs/digits_vmoe-20261122-101500\n"
    "  visionmoe train --recipe digits_vmoe --init runs/OTHER --set model.capacity_factor=1.5\n"
    "  visionmoe train --init upcycled/   # the architecture and settings saved in upcycled/\n"
    "  visionmoe train --recipe vmoe_s32_ilsvrc2012_ft384 --init s32/ --data imagenet/\n"
    "  torchrun --standalone --nproc-per-node 2 -m visionmoe.distributed.train \\\n"
    "      --recipe digits_vmoe",
    "eval": "visionmoe eval runs/digits_vmoe-... --capacity-factor 0.5 --batch-priority\n"
    "  visionmoe eval s32/ --data imagenet/ --set data.kind=folder --batch-size 64\n"
    "  visionmoe eval ckpts/vmoe_s32_last2_ilsvrc2012_randaug_light1 --data imagenet/ "
    "--preset vmoe_s32_last2_ilsvrc2012",
    "sweep": "visionmoe sweep runs/digits_vmoe-... --capacity-factors 0.1 0.25 0.5 1 2 4\n"
    "  visionmoe sweep s32/ --data imagenet/ --set preprocess.resize_small=none",
    "fewshot": "visionmoe fewshot runs/digits_vmoe-... --shots 1 5 10 25",
    "zeroshot": "visionmoe zeroshot runs/digits_limoe-...\n"
    "  visionmoe zeroshot runs/digits_limoe-... --template 'the digit {}' --template '{}'",
    "inspect": "visionmoe inspect runs/digits_vmoe-...",
    "predict": "visionmoe predict runs/digits_vmoe-... my_digit.png",
    "models": "visionmoe models 'vmoe*'",
    "convert": "visionmoe convert vmoe ckpts/vmoe_s32_last2_ilsvrc2012_randaug_light1 --out s32 "
    "--preset vmoe_s32_last2_ilsvrc2012\n"
    "  visionmoe convert dense vit_s16.safetensors --out vit_s16 --set num_heads=6\n\n"
    "getting the vmoe files (this command only reads local files): the released checkpoints are\n"
    "in the public Google Cloud Storage bucket named in the vmoe README, as\n"
    "gs://vmoe_checkpoints/NAME.index + NAME.data-NNNNN-of-NNNNN (NAME: a released\n"
    "name of a --preset); copy them next to each other and pass the common PREFIX:\n"
    "  gsutil cp 'gs://vmoe_checkpoints/vmoe_s32_last2_ilsvrc2012_randaug_light1.*' ckpts/\n"
    "or over https: https://storage.googleapis.com/vmoe_checkpoints/NAME.index (and each shard)",
    "upcycle": "visionmoe upcycle runs/digits_vit-... --out upcycled --set num_experts=8 top_k=2\n"
    "  visionmoe train --init upcycled",
    "recipes": "visionmoe recipes",
}


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, ``visionmoe <cmd>: error: ...`` (exit 2), like every CLI error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


SOURCE_HELP = (
    "the model: a run directory, a checkpoint directory, a save_pretrained folder or a vmoe "
    "checkpoint prefix (PREFIX.index present)"
)


def _add_source(p: argparse.ArgumentParser, data: bool = True) -> None:
    """SOURCE plus the options shared by every command that evaluates a model."""
    p.add_argument("source", metavar="SOURCE", help=SOURCE_HELP)
    if data:
        p.add_argument("--data", help="dataset path (default: the run's own dataset)")
        p.add_argument("--batch-size", type=int, help="evaluation batch size")
    p.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        nargs="+",
        metavar="KEY=VALUE",
        help="model.*, data.* or preprocess.* settings, e.g. data.kind=folder "
        "model.capacity_factor=1.5 preprocess.resize_small=none",
    )
    p.add_argument("--image-size", type=int, help="evaluate at this resolution")
    p.add_argument("--preset", help="vmoe checkpoint prefixes: a released-model preset")
    _add_device(p)


def _add_device(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--precision``, on every command that runs a model."""
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        help="fp32 (default) or bf16 autocast; routers stay float32",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="visionmoe", description="Sparse Vision Mixture-of-Experts: train, evaluate, inspect."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_: str, api: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_,
            description=f"{help_}\n\nPython API: {api}",
            epilog=f"example:\n  {EXAMPLES[name]}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    p = add(
        "train",
        "train (or resume, or fine-tune) a model from a recipe",
        "visionmoe.train.run.run_training",
    )
    p.add_argument(
        "--recipe",
        help="recipe name (see `visionmoe recipes`; default digits_vmoe, or with --init the "
        "config saved next to those weights)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        nargs="+",
        metavar="KEY=VALUE",
        help="override a config field, e.g. model.num_experts=16",
    )
    p.add_argument("--data", help="dataset path (shortcut for --set data.path=PATH)")
    p.add_argument("--run-dir", help="where to write the run (default runs/<recipe>-<time>)")
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run")
    p.add_argument(
        "--init",
        metavar="SOURCE",
        help="start from trained weights: a run, checkpoint, save_pretrained folder or vmoe "
        "checkpoint prefix",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_device(p)

    p = add(
        "eval",
        "test accuracy and compute spent, optionally with changed routing",
        "visionmoe.eval.classify.evaluate_run",
    )
    _add_source(p)
    p.add_argument("--capacity-factor", type=float)
    p.add_argument("--batch-priority", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--top-k", type=int)
    p.add_argument("--json", action="store_true", help="print JSON only")

    p = add(
        "sweep",
        "accuracy vs capacity factor, vanilla routing and BPR side by side",
        "visionmoe.eval.sweep.sweep_run",
    )
    _add_source(p)
    p.add_argument(
        "--capacity-factors",
        type=float,
        nargs="+",
        help="default: 0.1 0.25 0.5 0.75 1 1.25 2 4",
    )
    p.add_argument("--out", help="output directory (default SOURCE/sweep)")
    p.add_argument(
        "--orders",
        type=int,
        default=1,
        help="average over this many random test-set orders (routing groups change)",
    )

    p = add(
        "fewshot",
        "closed-form ridge few-shot linear probes on frozen pre-logits",
        "visionmoe.eval.fewshot_run.fewshot_run",
    )
    _add_source(p)
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10, 25])
    p.add_argument("--dataset", help="dataset kind to probe on (same as --set data.kind=KIND)")
    p.add_argument("--protocol", choices=["vmoe", "big_vision"], default="vmoe")

    p = add(
        "zeroshot",
        "zero-shot accuracy of an image-text (LIMoE) run from class prompts alone",
        "visionmoe.eval.zeroshot.zeroshot_run",
    )
    p.add_argument("run", metavar="RUN", help="an image-text (LIMoE) run or checkpoint")
    p.add_argument(
        "--template",
        dest="templates",
        action="append",
        metavar="TEXT",
        help="prompt template with {} for the class name (repeatable; default: digit prompts)",
    )
    p.add_argument("--dataset", help="labelled dataset kind to classify (default: digits)")
    p.add_argument("--data", help="path of that dataset")
    p.add_argument("--json", action="store_true", help="print JSON only")
    _add_device(p)

    p = add(
        "inspect",
        "what the routers learned: loads, class x expert heatmaps, patch maps",
        "visionmoe.eval.inspect.inspect_run",
    )
    _add_source(p)
    p.add_argument("--out", help="output directory (default SOURCE/inspect)")
    p.add_argument("--examples", type=int, default=8)

    p = add("predict", "top-5 classes for image files", "visionmoe.eval.classify.predict_files")
    _add_source(p, data=False)
    p.add_argument("images", nargs="+")

    p = add(
        "convert",
        "convert official V-MoE checkpoints or dense ViT weights to a save_pretrained folder",
        "visionmoe.convert.convert_vmoe_cli / convert_dense_cli",
    )
    p.add_argument("kind", choices=["vmoe", "dense"])
    p.add_argument(
        "source",
        help="vmoe checkpoint prefix (PREFIX.index + PREFIX.data-*, see below), or a "
        "timm/HF/big_vision weights file",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--preset", help="vmoe: a released-model preset (see visionmoe.convert)")
    p.add_argument("--format", default="auto", help="dense: auto | timm | hf | big_vision")
    p.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="model options, e.g. num_classes=10 image_size=384",
    )

    p = add(
        "upcycle",
        "sparse upcycling: copy a dense model's MLPs into experts, add fresh routers",
        "visionmoe.upcycle.upcycle_cli (visionmoe.upcycle for models)",
    )
    p.add_argument("source", metavar="SOURCE", help=SOURCE_HELP)
    p.add_argument("--out", required=True, help="output folder (use it with train --init)")
    p.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="num_experts=8 top_k=2 moe_layers=1,3 router=expert_choice "
        "normalize_combine=true train.steps=500 ...",
    )

    p = add("models", "list registered models", "visionmoe.list_models")
    p.add_argument("pattern", nargs="?", default="*")
    add("recipes", "list training recipes", "visionmoe.recipes.list_recipes")
    return parser
