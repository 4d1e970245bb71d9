"""``visionmoe`` command line: a thin dispatcher to the Python API.

Every subcommand maps to one function (named in its help) that does the same work.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from visionmoe.cli.parser import build_parser


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
        args = build_parser().parse_args(argv)
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
