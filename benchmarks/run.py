"""Run every benchmark family in one process and write ``perf.json`` + ``perf.md``.

Usage::

    python -m benchmarks.run                 # full run (a few minutes on 2 quiet cores)
    python -m benchmarks.run --quick         # CI smoke: 4 images, 3 repeats
    python -m benchmarks.run --only layer peers --threads 4 --out /tmp/perf

One process on purpose: every contender sees the same allocator, thread pool and machine state,
and families run one after another so they never compete for the cores. A family that raises is
recorded as an error row and the others still run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks.bounds import run_bounds
from benchmarks.compile import run_compile
from benchmarks.layer import run_bpr, run_gemm, run_layer
from benchmarks.memory import run_memory
from benchmarks.model import run_model
from benchmarks.peers import run_peers
from benchmarks.profile import run_profile
from benchmarks.report import render_markdown, render_table
from benchmarks.timing import (
    BenchConfig,
    env_info,
    error_text,
    load_average,
    quick_config,
    ratio_record,
    set_threads,
)
from visionmoe.cpu_memory import keep_freed_memory

FAMILIES: dict[str, Callable[[BenchConfig], dict]] = {
    "layer": run_layer,
    "peers": run_peers,
    "bpr": run_bpr,
    "gemm": run_gemm,
    "memory": run_memory,
    "model": run_model,
    "compile": run_compile,
    "profile": run_profile,
    "bounds": run_bounds,
}
DEFAULT_OUT = Path("benchmarks/results")


def run_all(
    cfg: BenchConfig, families: Sequence[str] | None = None, log: Callable[[str], None] = print
) -> dict:
    """Run the chosen families (all by default) and return the ``perf.json`` dict."""
    set_threads(cfg.threads)
    keep_freed_memory()  # as every visionmoe command on CPU does; applies to all contenders
    names = list(FAMILIES) if families is None else list(families)
    unknown = sorted(set(names) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown families {unknown}; choose from {list(FAMILIES)}")
    result = {
        "env": env_info(cfg.threads),
        "config": cfg.to_dict(),
        "families": names,
        "results": {},
        "ratios": [],
        "errors": {},
        "family_runtime_s": {},
    }
    start = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        log(f"[bench] {name} ...")
        try:
            out = FAMILIES[name](cfg)
        except Exception as exc:  # one broken family must not lose the others' numbers
            err = error_text(exc)
            out = {
                "results": {},
                "ratios": [
                    ratio_record(
                        f"{name}.failed", name, f"{name} family", None, None, None, error=err
                    )
                ],
                "errors": {"family": err},
            }
        result["results"][name] = out["results"]
        result["ratios"].extend(out["ratios"])
        if out["errors"]:
            result["errors"][name] = out["errors"]
        result["family_runtime_s"][name] = time.perf_counter() - t0
        log(f"[bench] {name} done in {result['family_runtime_s'][name]:.0f} s")
    result["runtime_s"] = time.perf_counter() - start
    result["env"]["loadavg_end"] = load_average()
    return result


def write_outputs(result: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write ``perf.json`` and ``perf.md`` into ``out_dir`` (created if needed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "perf.json", out_dir / "perf.md"
    json_path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    md_path.write_text(render_markdown(result), encoding="utf-8")
    return json_path, md_path


def build_config(args: argparse.Namespace) -> BenchConfig:
    cfg = quick_config(args.threads) if args.quick else BenchConfig(threads=args.threads)
    if args.repeats is not None:
        cfg.repeats = args.repeats
    if args.compile_backend is not None:
        cfg.compile_backend = args.compile_backend
    if args.model_batch is not None:
        cfg.model_batch = args.model_batch
    return cfg


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="visionmoe CPU performance benchmarks (writes perf.json and perf.md).",
    )
    p.add_argument("--quick", action="store_true", help="CI smoke: 4 images, 3 repeats")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--repeats", type=int, default=None, help="override the repeat count")
    p.add_argument("--only", nargs="+", choices=list(FAMILIES), help="run only these families")
    p.add_argument("--skip", nargs="+", choices=list(FAMILIES), default=(), help="skip these")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (inductor)")
    p.add_argument(
        "--model-batch", type=_positive, default=None, help="images per model-family step (8)"
    )
    return p.parse_args(argv)


def _log_stderr(message: str) -> None:
    """Progress goes to stderr so stdout carries only the table."""
    print(message, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = build_config(args)
    families = [f for f in (args.only or FAMILIES) if f not in set(args.skip)]
    result = run_all(cfg, families, log=_log_stderr)
    json_path, md_path = write_outputs(result, args.out)
    print(render_table(result, details=True))
    print(f"\nwrote {json_path} and {md_path} in {result['runtime_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
