"""``torch.compile`` of our SparseMoE layer vs eager.

Eager runs the default dispatch (``auto``: on CPU in float32 training, static when the plan
fills at least 85% of the slots, else compact; the note records which one ran). Under compile,
``auto`` resolves to the static dispatch, whose shapes depend only on the config, so the layer
traces without graph breaks on data-dependent sizes. Both copies share initial weights; the
ratio is compiled time / eager time for forward+backward, so < 1 means compiling pays off. A
failure to compile is recorded, not raised: it is a result in itself.
"""

from __future__ import annotations

import copy
import time

import torch

from benchmarks.layer import make_input, make_moe, moe_train_fn
from benchmarks.timing import (
    BenchConfig,
    compare,
    error_text,
    ratio_record,
    summarize,
    timing_ratio,
)
from visionmoe.layers.dispatch import resolve_dispatch

COMPILE_TARGET = 1.0
TOP_K = 2
CAPACITY_FACTOR = 1.05


def run_compile(cfg: BenchConfig) -> dict:
    """Compiled vs eager forward+backward time of the top-2, cf 1.05 layer (E = ``cfg.experts``)."""
    torch.manual_seed(cfg.seed)
    x = make_input(cfg)
    eager = make_moe(cfg, TOP_K, CAPACITY_FACTOR)
    rid = "compile.fwd_bwd"
    metric = (
        f"torch.compile / eager fwd+bwd time, E={cfg.experts} top-2 cf 1.05 ({cfg.compile_backend})"
    )
    try:
        torch.compiler.reset()
        compiled = torch.compile(copy.deepcopy(eager), backend=cfg.compile_backend)
        start = time.perf_counter()
        moe_train_fn(compiled, x)()
        compile_s = time.perf_counter() - start
    except Exception as exc:  # a compile failure is the measurement
        err = error_text(exc)
        row = ratio_record(rid, "compile", metric, None, "<=", COMPILE_TARGET, error=err)
        return {"results": {}, "ratios": [row], "errors": {"compile": err}}
    with torch.no_grad():
        plan, _ = eager.router(x.reshape(-1, x.shape[-1]), eager.group_size)
    with torch.enable_grad():
        eager_path = resolve_dispatch("auto", x, plan)
    samples = compare(
        {"eager": moe_train_fn(eager, x), "compiled": moe_train_fn(compiled, x)},
        cfg.repeats,
        cfg.warmup,
    )
    results = {
        "compile": {
            "backend": cfg.compile_backend,
            "first_call_s": compile_s,
            "times_s": {k: summarize(s) for k, s in samples.items()},
        }
    }
    row = timing_ratio(
        rid,
        "compile",
        metric,
        samples["compiled"],
        samples["eager"],
        "<=",
        COMPILE_TARGET,
        note=f"first compiled call {compile_s:.0f} s; eager uses dispatch auto ({eager_path})",
    )
    return {"results": results, "ratios": [row], "errors": {}}
