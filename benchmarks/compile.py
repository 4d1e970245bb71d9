"""``torch.compile`` of our SparseMoE layer vs eager.

Eager runs the default dispatch (``auto``: on CPU in float32 training, static when the plan
fills at least 85% of the slots, else compact; the note records which one ran). Under compile,
``auto`` resolves to the static dispatch, whose shapes depend only on the config, so the layer
traces without graph breaks on data-dependent sizes. Both copies share initial weights; the
ratio is compiled time / eager time for forward+backward, so < 1 means compiling pays off. A
failure to compile is recorded, not raised: it is a result in itself.

The family also times one training step of the whole V-MoE of the ``model`` family (forward,
backward, AdamW), compiled with ``nn.Module.compile`` as ``train.compile=true`` does, against
the same model in eager mode, per precision: an information row, no target.
"""

from __future__ import annotations

import copy
import time
from functools import partial

import torch

from benchmarks.layer import make_input, make_moe, moe_train_fn
from benchmarks.model import LR, build_models, make_batch, train_step
from benchmarks.timing import (
    PRECISION_LABEL,
    BenchConfig,
    compare,
    error_text,
    ratio_record,
    summarize,
    timing_ratio,
)
from visionmoe.layers.dispatch import resolve_dispatch
from visionmoe.train.config import OptimConfig
from visionmoe.train.optim import build_optimizer

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
    model = run_compile_model(cfg)
    results.update(model["results"])
    return {"results": results, "ratios": [row, *model["ratios"]], "errors": model["errors"]}


def run_compile_model(cfg: BenchConfig) -> dict:
    """Compiled / eager time of one whole-model training step, per precision (information)."""
    eager = build_models(cfg)[0]["moe"]
    config = eager.config
    batch = cfg.model_batch
    images, labels = make_batch(cfg, config)
    results, ratios, errors = {}, [], {}
    for prec in cfg.precisions:
        rid = f"compile.model.{prec}"
        metric = (
            f"torch.compile / eager training step time, whole V-MoE, {PRECISION_LABEL[prec]} "
            f"({cfg.compile_backend})"
        )
        steps = {}
        try:
            torch.compiler.reset()
            compiled = copy.deepcopy(eager)
            compiled.compile(backend=cfg.compile_backend)
            for name, model in (("eager", eager), ("compiled", compiled)):
                opt = build_optimizer(model, OptimConfig(lr=LR))
                steps[name] = partial(train_step, model, opt, images, labels, prec)
            start = time.perf_counter()
            steps["compiled"]()
            compile_s = time.perf_counter() - start
        except Exception as exc:  # a compile failure is the measurement
            errors[rid] = error_text(exc)
            ratios.append(ratio_record(rid, "compile", metric, None, None, None, error=errors[rid]))
            continue
        samples = compare(steps, cfg.repeats, cfg.warmup)
        results[f"compile_model_{prec}"] = {
            "backend": cfg.compile_backend,
            "batch": batch,
            "first_call_s": compile_s,
            "times_s": {k: summarize(s) for k, s in samples.items()},
        }
        ratios.append(
            timing_ratio(
                rid,
                "compile",
                metric,
                samples["compiled"],
                samples["eager"],
                None,
                None,
                note=f"{cfg.model_name} {cfg.model_overrides}, batch {batch}; "
                f"first compiled step {compile_s:.0f} s",
            )
        )
    return {"results": results, "ratios": ratios, "errors": errors}
