"""Shared measurement utilities: interleaved timing, paired ratios, targets, environment.

Why interleave: on a shared or thermally throttled CPU the machine's speed drifts over a run. If
contender A ran all its repeats before contender B, the drift would land entirely in the A/B
ratio. :func:`compare` therefore runs every contender once per repeat (rotating the order so no
contender is always first), and :func:`paired_ratio` divides the two times taken in the *same*
repeat before taking the median, so a slow patch of time cancels out of each ratio.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch

from visionmoe.cpu_memory import keeping_freed_memory

OPS = ("<=", ">=")


@dataclass
class BenchConfig:
    """Every size and knob the benchmark families read, so tests can shrink all of them at once.

    The defaults are the target shapes: T = 16 images x 197 tokens (ViT-S/16 at 224 px with a
    class token), D = 384, F = 1536, routing groups of 8 images (vmoe's default), E = 32 (the
    V-MoE paper's) for the single-E families and E in ``layer_experts`` for the layer family, in
    float32 and under bf16 autocast, on 2 threads. The whole-model family builds a ViT-S/16 with
    ``model_overrides`` (4 blocks instead of 12 to keep the run short; width, MLP and E as V-MoE).
    """

    images: int = 16
    tokens_per_image: int = 197
    dim: int = 384
    hidden: int = 1536
    experts: int = 32
    layer_experts: tuple[int, ...] = (8, 32)
    precisions: tuple[str, ...] = ("float32", "bfloat16")
    group_images: int | None = 8
    repeats: int = 5
    warmup: int = 1
    threads: int = 2
    seed: int = 0
    memory_repeats: int = 3
    profile_steps: int = 3
    memory_experts: int = 8
    soft_experts: int = 32
    soft_slots: int = 1
    model_name: str = "vit_s16"
    model_batch: int = 8
    model_overrides: dict[str, object] = field(
        default_factory=lambda: {
            "num_layers": 4,
            "moe_layers": (1, 3),
            "num_experts": 32,
            "top_k": 2,
            "capacity_factor": 1.05,
            "group_images": 8,
        }
    )
    compile_backend: str = "inductor"
    quick: bool = False

    @property
    def tokens(self) -> int:
        return self.images * self.tokens_per_image

    @property
    def group_size(self) -> int | None:
        """Routing group in tokens (``group_images`` whole images; None: one group)."""
        if self.group_images is None or self.group_images >= self.images:
            return None
        return self.group_images * self.tokens_per_image

    def to_dict(self) -> dict:
        out = asdict(self)
        out["tokens"] = self.tokens
        out["group_size"] = self.group_size
        return out


PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PRECISION_LABEL = {"float32": "fp32", "bfloat16": "bf16 autocast"}


def precision(name: str) -> contextlib.AbstractContextManager:
    """``float32``: nothing; ``bfloat16``: CPU autocast to bf16 (mixed-precision training)."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {name!r}")
    if name == "float32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=PRECISIONS[name])


def quick_config(threads: int = 2) -> BenchConfig:
    """CI smoke settings: same widths, 4 images instead of 16, fewer repeats, smaller batch."""
    return BenchConfig(
        images=4,
        repeats=3,
        memory_repeats=1,
        profile_steps=1,
        model_batch=4,
        threads=threads,
        quick=True,
    )


def summarize(samples: Sequence[float]) -> dict:
    """Median plus spread (min, max, quartiles) of one contender's samples, in seconds."""
    values = sorted(float(s) for s in samples)
    if not values:
        raise ValueError("no samples to summarize")
    q1, q3 = (values[0], values[-1]) if len(values) < 2 else _quartiles(values)
    return {
        "median": statistics.median(values),
        "min": values[0],
        "max": values[-1],
        "q1": q1,
        "q3": q3,
        "n": len(values),
        "samples": [float(s) for s in samples],
    }


def _quartiles(values: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def time_once(fn: Callable[[], object]) -> float:
    """Wall time of one call. ``gc.collect`` first so a collection does not land inside it."""
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(
    contenders: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Time each contender ``repeats`` times, interleaved; returns the raw samples per name.

    Every contender is warmed up first (allocator pools, oneDNN primitive caches, lazy init), then
    each repeat runs all contenders once, in an order rotated by one position per repeat.
    """
    names = list(contenders)
    for name in names:
        for _ in range(warmup):
            contenders[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(time_once(contenders[name]))
    return samples


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> dict:
    """Median and range of per-repeat ratios ``numerator[i] / denominator[i]``."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError("paired_ratio needs two equally long, non-empty sample lists")
    ratios = sorted(n / d for n, d in zip(numerator, denominator, strict=True))
    return {"value": statistics.median(ratios), "lo": ratios[0], "hi": ratios[-1]}


def ratio_record(
    rid: str,
    family: str,
    metric: str,
    value: float | None,
    op: str | None,
    threshold: float | None,
    *,
    lo: float | None = None,
    hi: float | None = None,
    method: str = "",
    note: str = "",
    error: str | None = None,
) -> dict:
    """One row of the results table: a measured ratio, its target and whether it is met.

    ``op=None`` marks an informational row (no target). ``error`` marks a row that could not be
    measured (the value is then None); the reason is kept so the table shows why.
    """
    if op is not None and op not in OPS:
        raise ValueError(f"op must be one of {OPS} or None, got {op!r}")
    if error is not None or value is None:
        status = "error"
    elif op is None:
        status = "info"
    else:
        met = value <= threshold if op == "<=" else value >= threshold
        status = "pass" if met else "miss"
    return {
        "id": rid,
        "family": family,
        "metric": metric,
        "value": None if value is None else float(value),
        "lo": None if lo is None else float(lo),
        "hi": None if hi is None else float(hi),
        "target": None if op is None else f"{op} {threshold:g}",
        "op": op,
        "threshold": threshold,
        "status": status,
        "method": method,
        "note": note,
        "error": error,
    }


def timing_ratio(
    rid: str,
    family: str,
    metric: str,
    numerator: Sequence[float],
    denominator: Sequence[float],
    op: str | None,
    threshold: float | None,
    method: str = "median of per-repeat time ratios",
    note: str = "",
) -> dict:
    """A :func:`ratio_record` from two contenders' interleaved samples."""
    r = paired_ratio(numerator, denominator)
    return ratio_record(
        rid,
        family,
        metric,
        r["value"],
        op,
        threshold,
        lo=r["lo"],
        hi=r["hi"],
        method=method,
        note=note,
    )


def error_text(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line, truncated: enough to see why, small enough for a table."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ").strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def env_info(threads: int) -> dict:
    """What a reader needs to judge the numbers: versions, threads, CPU, load, date."""
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "torch_num_threads": torch.get_num_threads(),
        "loadavg_start": load_average(),
        "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", ""),
        "cpu_allocator": "keep freed memory" if keeping_freed_memory() else "system default",
    }


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: other processes on the cores distort ratios, so record it."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def set_threads(threads: int) -> None:
    """Pin intra-op threads (the knob that matters for CPU GEMMs); interop stays as is."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def zero_grads(*tensors_or_modules) -> None:
    """Drop gradients (set to None), as an optimizer's ``zero_grad`` does by default."""
    for item in tensors_or_modules:
        params = item.parameters() if isinstance(item, torch.nn.Module) else [item]
        for p in params:
            p.grad = None
