"""Where the time goes: torch.profiler self-CPU time per step, by kind of work.

For the settings whose targets are hardest (the MoE layer at E = max(``cfg.layer_experts``),
top-1, cf 1.0, and the whole-model training step of the ``model`` family), each contender runs
``cfg.profile_steps`` steps under :class:`torch.profiler.profile` after a warm-up, in every
precision of ``cfg.precisions``. Self time of every aten op is summed into buckets:

- ``gemm``: mm / bmm / baddbmm / addmm / grouped_mm (experts, dense MLPs, attention projections);
- ``casts``: ``copy_`` / ``_to_copy`` (under autocast mostly the per-step fp32 -> bf16 weight
  casts and bf16 -> fp32 weight-gradient casts, whose size is E/K times the dense layer's);
- ``optimizer``: fused or foreach AdamW kernels and the for-each kernels of gradient clipping
  (norms, rescale);
- ``attention``, ``gelu``, ``norm``;
- ``routing``: top-k, sort, softmax, scatter/gather and index ops of routing and dispatch;
- ``other``.

Alongside, ``param_bytes`` counts what a step must stream per parameter whatever the kernels
do: the MoE layer's E x (D x F x 2) expert weights against the dense layer's K x D x F x 2.
Profiles are single runs on a possibly shared machine: read shares, not absolute times. Each
row also counts minor page faults per step (see :data:`FAULTS_NOTE`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.layer import make_dense, make_input, make_moe
from benchmarks.model import build_models, make_batch, train_step
from benchmarks.timing import BenchConfig, precision, zero_grads
from visionmoe.train.config import OptimConfig
from visionmoe.train.optim import build_optimizer

FAULTS_NOTE = (
    "Page faults are minor faults per step while profiling; the last two columns are the same "
    "steps run without the profiler (median wall time, faults per step). Under the profiler the "
    "MoE training steps were seen to fault on tens of thousands of 4 KB pages per step where "
    "the plain steps make none (the CPU allocator keeps freed memory); the faults are charged "
    "to the first op that writes a fresh buffer, usually a dtype cast, so a large casts bucket "
    "next to many faults overstates what casts cost in a plain run."
)
BUCKETS = ("gemm", "casts", "optimizer", "attention", "gelu", "norm", "routing", "other")
_GEMM = {"aten::mm", "aten::bmm", "aten::baddbmm", "aten::addmm", "aten::_grouped_mm"}
_CASTS = {"aten::copy_", "aten::_to_copy"}
_ROUTING_WORDS = ("topk", "sort", "softmax", "scatter", "gather", "index", "cumsum", "bincount")


def bucket(op: str) -> str:
    """The bucket of an aten op name (see the module docstring)."""
    if op in _GEMM:
        return "gemm"
    if op in _CASTS:
        return "casts"
    if "adam" in op or op.startswith("aten::_foreach"):
        return "optimizer"
    if "scaled_dot_product" in op:
        return "attention"
    if "gelu" in op:
        return "gelu"
    if "layer_norm" in op:
        return "norm"
    if any(word in op for word in _ROUTING_WORDS):
        return "routing"
    return "other"


def profile_steps(fn: Callable[[], None], steps: int, warmup: int = 2) -> dict[str, float]:
    """Self-CPU milliseconds per step of ``fn`` by bucket, ``total``, ``page_faults`` (minor page
    faults per step while profiling), then ``plain_ms`` / ``plain_page_faults``: median wall time
    and faults per step of as many steps run without the profiler."""
    for _ in range(warmup):
        fn()
    faults = _minor_faults()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    faults = _minor_faults() - faults
    out = dict.fromkeys(BUCKETS, 0.0)
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            out[bucket(event.key)] += event.self_cpu_time_total / 1e3 / steps
    out["total"] = sum(out[b] for b in BUCKETS)
    out = {k: round(v, 2) for k, v in out.items()}
    out["page_faults"] = round(faults / steps)
    # The same steps without the profiler: its own allocations change what the heap can reuse.
    times, faults = [], _minor_faults()
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    out["plain_ms"] = round(statistics.median(times) * 1e3, 2)
    out["plain_page_faults"] = round((_minor_faults() - faults) / steps)
    return out


def _minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is unavailable)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _layer_step(layer: torch.nn.Module, x: torch.Tensor, prec: str) -> Callable[[], None]:
    def run() -> None:
        zero_grads(layer, x)
        with precision(prec):
            y = layer(x)
            y = y[0] if isinstance(y, tuple) else y
        y.float().sum().backward()

    return run


def run_profile(cfg: BenchConfig) -> dict:
    """Profiles of the E = max layer (top-1, cf 1.0) and of the model training step."""
    experts = max(cfg.layer_experts)
    torch.manual_seed(cfg.seed)
    x = make_input(cfg)
    moe = make_moe(cfg, 1, 1.0, experts=experts)
    dense = make_dense(cfg, 1)
    steps = cfg.profile_steps
    results: dict[str, dict] = {}
    for prec in cfg.precisions:
        results[f"layer_e{experts}_top1_{prec}"] = {
            "what": f"MoE layer fwd+bwd, E={experts} top-1 cf 1.0, dispatch auto, vs dense FFN",
            "steps": steps,
            "param_bytes_fp32": {
                "moe": sum(p.numel() for p in moe.experts.parameters()) * 4,
                "dense": sum(p.numel() for p in dense.parameters()) * 4,
            },
            "ms_per_step": {
                "moe": profile_steps(_layer_step(moe, x, prec), steps),
                "dense": profile_steps(_layer_step(dense, x, prec), steps),
            },
        }
    models, config = build_models(cfg)
    images, labels = make_batch(cfg, config)
    optimizers = {k: build_optimizer(m, OptimConfig(lr=1e-4)) for k, m in models.items()}
    for prec in cfg.precisions:
        results[f"model_train_{prec}"] = {
            "what": f"{cfg.model_name} training step (fwd+bwd+clip+AdamW), "
            f"batch {cfg.model_batch}, vs dense twin",
            "steps": steps,
            "param_bytes_fp32": {
                k: sum(p.numel() for p in m.parameters()) * 4 for k, m in models.items()
            },
            "ms_per_step": {
                k: profile_steps(partial(train_step, m, optimizers[k], images, labels, prec), steps)
                for k, m in models.items()
            },
        }
    return {"results": results, "ratios": [], "errors": {}}


def render_profiles(results: dict) -> str:
    """Markdown: one table per profiled setting, buckets as columns, contenders as rows."""
    out = []
    for name, data in results.items():
        out += [
            f"**{name}**: {data['what']}; self-CPU ms per step, {data['steps']} steps.",
            "",
            "| Contender | fp32 params (MB) | "
            + " | ".join(BUCKETS)
            + " | total | page faults | plain step (ms) | plain page faults |",
            "|---" * (len(BUCKETS) + 6) + "|",
        ]
        for who, ms in data["ms_per_step"].items():
            mb = data["param_bytes_fp32"][who] / 1e6
            cells = " | ".join(f"{ms[b]:.1f}" for b in (*BUCKETS, "total"))
            extra = " | ".join(
                str(ms.get(k, "")) for k in ("page_faults", "plain_ms", "plain_page_faults")
            )
            out.append(f"| {who} | {mb:.1f} | {cells} | {extra} |")
        out.append("")
    out.append(FAULTS_NOTE)
    return "\n".join(out)
