"""``visionmoe`` command line: a thin dispatcher to the Python API.

Every subcommand maps to one function (named in its help) that does the same work.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
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


def _eval_options(args: argparse.Namespace):
    from visionmoe.eval.inputs import EvalOptions

    return EvalOptions(
        data=getattr(args, "data", None),
        settings=tuple(item for group in args.settings for item in group),
        batch_size=getattr(args, "batch_size", None),
        image_size=args.image_size,
        preset=args.preset,
        device=args.device,
        precision=args.precision or "fp32",
    )


def _parser() -> argparse.ArgumentParser:
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


def _train(args: argparse.Namespace) -> int:
    from visionmoe.train.config import apply_set
    from visionmoe.train.run import run_training
    from visionmoe.train.rundir import initial_config

    overrides = [item for group in args.overrides for item in group]
    if args.data:
        overrides.append(f"data.path={args.data}")
    if args.precision:
        overrides.append(f"train.precision={args.precision}")
    if args.resume:
        if overrides or args.init:
            raise ValueError(
                "--resume continues a run as configured (only --device may change); drop "
                "--set/--data/--init/--precision"
            )
        saved = Path(args.resume) / "config.json"
        config = None
        if args.device and saved.is_file():
            from visionmoe.train.config import ExperimentConfig

            config = ExperimentConfig.from_dict(json.loads(saved.read_text()))
            config = apply_set(config, [f"train.device={args.device}"])
        summary = run_training(config, resume=args.resume, progress=not args.no_progress)
    else:
        if args.device:
            overrides.append(f"train.device={args.device}")
        config = apply_set(initial_config(args.recipe, args.init), overrides)
        summary = run_training(
            config, run_dir=args.run_dir, init=args.init, progress=not args.no_progress
        )
    accuracy = summary["test_accuracy"]
    label = "zero-shot test accuracy" if "zeroshot_accuracy" in summary else "test accuracy"
    print(f"{label}: {'n/a' if accuracy is None else f'{accuracy:.4f}'}")
    print(f"run directory: {summary['run_dir']}")
    print(f"  config.json, metrics.jsonl, summary.json, checkpoints/ ({summary['checkpoint']})")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from visionmoe.convert import convert_dense_cli, convert_vmoe_cli
    from visionmoe.train.config import parse_model_options

    overrides = parse_model_options(args.overrides)
    if args.kind == "vmoe":
        out = convert_vmoe_cli(args.source, args.out, args.preset, overrides)
    else:
        out = convert_dense_cli(args.source, args.out, args.format, overrides)
    print(f"wrote {out} (load it with visionmoe.from_pretrained)")
    return 0


def _upcycle(args: argparse.Namespace) -> int:
    from visionmoe.upcycle import upcycle_cli

    out = upcycle_cli(args.source, args.out, args.overrides)
    recipe = "" if (out / "checkpoints").is_dir() else "--recipe RECIPE "
    print(f"wrote {out}; continue training with: visionmoe train {recipe}--init {out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from visionmoe.eval.classify import evaluate_run

    result = evaluate_run(
        args.source,
        args.capacity_factor,
        args.batch_priority,
        args.top_k,
        options=_eval_options(args),
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"accuracy {result['accuracy']:.4f}  loss {result['loss']:.4f}  "
            f"compute {result['compute_frac']:.3f} of token-expert assignments  "
            f"{result['seconds']:.2f}s ({result['images_per_s']:.0f} img/s)"
        )
        if "ece" in result:
            members = ", ".join(f"{a:.4f}" for a in result["member_accuracy"])
            print(
                f"ensemble NLL {result['loss']:.4f}  ECE {result['ece']:.4f}  "
                f"member accuracy {members}"
            )
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from visionmoe.eval.sweep import DEFAULT_CAPACITY_FACTORS, sweep_run, sweep_table

    factors = tuple(args.capacity_factors or DEFAULT_CAPACITY_FACTORS)
    result = sweep_run(
        args.source, factors, args.out, orders=args.orders, options=_eval_options(args)
    )
    print(sweep_table(result["rows"]), end="")
    n, orders = result["num_examples"], result["orders"]
    # Differences of a few images flip sign between test orders; say how big one image is.
    print(
        f"{n} test examples (one example = {100 / n:.2f} accuracy points), "
        f"{orders} test order{'s' if orders > 1 else ''}"
        + ("" if orders > 1 else "; --orders 10 averages out how images share routing groups")
    )
    print("wrote " + ", ".join(result["files"]))
    return 0


def _fewshot(args: argparse.Namespace) -> int:
    from visionmoe.eval.fewshot_run import fewshot_run

    result = fewshot_run(
        args.source,
        tuple(args.shots),
        args.dataset,
        protocol=args.protocol,
        options=_eval_options(args),
    )
    for dataset, per_shot in result.accuracy.items():
        cells = "  ".join(f"{shot}-shot {acc:.4f}" for shot, acc in per_shot.items())
        print(f"{dataset}: {cells}")
    lams = ", ".join(f"{s}: 2^{_log2(v)}" for s, v in result.lambda_per_shot.items())
    print(f"protocol {result.protocol}; ridge lambda per shot {lams}")
    return 0


def _log2(value: float) -> str:
    import math

    return f"{math.log2(value):g}"


def _zeroshot(args: argparse.Namespace) -> int:
    from visionmoe.eval.zeroshot import zeroshot_run

    result = zeroshot_run(
        args.run,
        args.templates,
        args.dataset,
        args.data,
        device=args.device,
        precision=args.precision or "fp32",
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"zero-shot accuracy {result['accuracy']:.4f} on {result['dataset']} "
            f"({result['num_examples']} images, {result['num_classes']} classes, "
            f"prompts e.g. {result['example_prompts']})"
        )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from visionmoe.eval.inspect import inspect_run

    report = inspect_run(
        args.source, args.out, num_examples=args.examples, options=_eval_options(args)
    )
    print(f"wrote {report} (and PNG figures in {Path(report).parent})")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from visionmoe.eval.classify import predict_files

    for item in predict_files(args.source, args.images, options=_eval_options(args)):
        top = ", ".join(f"{t['class']} {t['prob']:.3f}" for t in item["top"])
        print(f"{item['path']}: {top}")
    return 0


def _models(args: argparse.Namespace) -> int:
    from visionmoe.models.registry import list_models, model_description

    for name in list_models(args.pattern):
        print(f"{name:22s} {model_description(name)}")
    return 0


def _recipes(args: argparse.Namespace) -> int:
    from visionmoe.recipes import list_recipes, recipe_description

    for name in list_recipes():
        print(f"{name:22s} {recipe_description(name)}")
    return 0


COMMANDS = {
    "train": _train,
    "eval": _eval,
    "sweep": _sweep,
    "fewshot": _fewshot,
    "zeroshot": _zeroshot,
    "inspect": _inspect,
    "predict": _predict,
    "convert": _convert,
    "upcycle": _upcycle,
    "models": _models,
    "recipes": _recipes,
}


def main(argv: list[str] | None = None) -> int:
    """Run one command; any error becomes one line on stderr and exit status 2 (or 130).

    ``VISIONMOE_TRACEBACK=1`` re-raises instead, to debug the library itself.
    """
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # usage errors (already printed) and --help
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"visionmoe {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if os.environ.get("VISIONMOE_TRACEBACK") == "1":
            raise
        print(f"visionmoe {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2


def _one_line(err: Exception) -> str:
    """The error's message on one line; its type too unless it is a plain bad-value error."""
    text = " ".join(str(err).split()) or repr(err)
    if isinstance(err, KeyError):
        text = f"missing key {text}"
    if not isinstance(err, (ValueError, OSError, KeyError)):
        text = f"{type(err).__name__}: {text}"
    return text
