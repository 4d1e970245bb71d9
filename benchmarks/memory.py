"""Peak CPU memory of MoE forward+backward vs the dense FFN at equal active FLOPs (target 5).

Method: run the step under ``torch.profiler`` with ``profile_memory=True`` and replay the raw
allocator records (every allocation and free, signed byte counts, CPU device) in time order; the
peak of the running sum is the most memory the step held above what existed before it. The raw
records are read from the profiler's result rather than from ``prof.events()`` because the parsed
events fold each allocation into the innermost op that contains it, and summing nested ops counts
the same bytes several times. :func:`validate_method` checks the replay on allocations of known
size before it is trusted; if it fails, or the raw records are not reachable in this torch
version, the family falls back to the bytes of unique storages saved for backward plus the
output (:func:`saved_bytes`), and the table says which method produced the number.

Gradients are set to None before each measured step, as an optimizer's ``zero_grad`` does, so
the weight gradients allocated by the backward count: for an MoE with E experts they are E times
those of one expert, which is part of what training it costs.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

from benchmarks.layer import make_dense, make_input, make_moe
from benchmarks.timing import BenchConfig, error_text, ratio_record, zero_grads

MEMORY_TARGET = 1.3
TOP_K = 2
CAPACITY_FACTOR = 1.25
PROFILER_METHOD = "allocator peak (torch.profiler alloc/free replay)"
SAVED_METHOD = "saved-for-backward storages + output (saved_tensors_hooks)"


def _cpu_memory_records(prof) -> list[tuple[int, int]]:
    """``(time_ns, signed_bytes)`` of every CPU allocator record of a finished profile."""
    from torch.autograd import DeviceType

    raw = prof.profiler.kineto_results
    cpu = {DeviceType.CPU, DeviceType.MKLDNN, DeviceType.IDEEP}
    records = [
        (e.start_ns(), e.nbytes())
        for e in raw.events()
        if e.name() == "[memory]" and e.device_type() in cpu
    ]
    return sorted(records, key=lambda r: r[0])


def profiler_peak(fn: Callable[[], object]) -> int:
    """Peak bytes allocated above the starting point while ``fn`` runs (allocator replay)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for _, nbytes in _cpu_memory_records(prof):
        current += nbytes
        peak = max(peak, current)
    return peak


def validate_method() -> tuple[bool, str]:
    """Replay a known pattern (4 MiB, +2 MiB, -4 MiB, +1 MiB): the peak must be 6 MiB."""
    mib = 1 << 20

    def pattern() -> None:
        a = torch.empty(4 * mib, dtype=torch.uint8)
        b = torch.empty(2 * mib, dtype=torch.uint8)
        del a
        c = torch.empty(mib, dtype=torch.uint8)
        del b, c

    try:
        got = profiler_peak(pattern)
    except Exception as exc:  # the raw records are not public API; any failure means fall back
        return False, error_text(exc)
    expected = 6 * mib
    return got == expected, f"known-allocation check: {got} bytes, expected {expected}"


def saved_bytes(step: Callable[[], Tensor], exclude: list[Tensor]) -> int:
    """Bytes of unique storages saved for backward by ``step()`` plus its output.

    Storages of ``exclude`` (parameters, the input) exist before the step in both contenders and
    are not counted.
    """
    known = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in known:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step()
    out_storage = out.untyped_storage()
    seen.setdefault(out_storage.data_ptr(), out_storage.nbytes())
    return sum(seen.values())


def run_memory(cfg: BenchConfig) -> dict:
    """Peak memory of top-2 cf 1.25 MoE (both dispatch paths) vs the dense ``K * F`` FFN."""
    torch.manual_seed(cfg.seed)
    x = make_input(cfg)
    dense = make_dense(cfg, TOP_K)
    moes = {
        f"moe_{m}": make_moe(cfg, TOP_K, CAPACITY_FACTOR, m, experts=cfg.memory_experts)
        for m in ("auto", "static")
    }

    def forward(name: str) -> tuple[Tensor, Tensor]:
        """The layer output and the training loss built from it."""
        if name == "dense":
            y = dense(x)
            return y, y.sum()
        y, aux = moes[name](x)
        return y, y.sum() + aux.loss

    modules = {"dense": dense, **moes}
    names = list(modules)

    def fwd_bwd(name: str) -> Callable[[], None]:
        def step() -> None:
            forward(name)[1].backward()

        return step

    ok, check = validate_method()
    peaks: dict[str, list[int]] = {n: [] for n in names}
    errors: dict[str, str] = {}
    if ok:
        for name in names:
            fwd_bwd(name)()  # warm-up: lazy init must not count
        for _ in range(max(1, cfg.memory_repeats)):
            for name in names:
                # Outside the profile: freeing old gradients must not lower the baseline.
                zero_grads(*modules.values(), x)
                peaks[name].append(profiler_peak(fwd_bwd(name)))
    else:
        errors["profiler"] = check
    saved = {}
    for name in names:
        zero_grads(*modules.values(), x)
        params = list(modules[name].parameters())
        saved[name] = saved_bytes(lambda n=name: forward(n)[0], [x, *params])
    param_bytes = {
        n: sum(p.numel() * p.element_size() for p in m.parameters()) for n, m in modules.items()
    }
    results = {
        "memory": {
            "method": PROFILER_METHOD if ok else SAVED_METHOD,
            "validation": check,
            "peak_bytes": {n: statistics.median(v) for n, v in peaks.items() if v},
            "peak_samples": peaks,
            "saved_bytes": saved,
            "param_bytes": param_bytes,
        }
    }
    ratios = []
    for mode in ("auto", "static"):
        name = f"moe_{mode}"
        metric = (
            f"Peak memory MoE/dense, fwd+bwd, E={cfg.memory_experts} top-2 cf 1.25, dispatch {mode}"
        )
        mib = {n: b / 2**20 for n, b in param_bytes.items()}
        note = f"params {mib[name]:.1f} MiB (MoE) vs {mib['dense']:.1f} MiB (dense)"
        if ok:
            value = statistics.median(peaks[name]) / statistics.median(peaks["dense"])
            ratios.append(
                ratio_record(
                    f"memory.peak.{mode}",
                    "memory",
                    metric,
                    value,
                    "<=",
                    MEMORY_TARGET,
                    method=PROFILER_METHOD,
                    note=note + "; weight grads included",
                )
            )
        else:
            ratios.append(
                ratio_record(
                    f"memory.peak.{mode}",
                    "memory",
                    metric,
                    saved[name] / saved["dense"],
                    "<=",
                    MEMORY_TARGET,
                    method=SAVED_METHOD,
                    note=note + "; " + check,
                )
            )
        if ok:
            ratios.append(
                ratio_record(
                    f"memory.saved.{mode}",
                    "memory",
                    f"Saved activations MoE/dense, top-2 cf 1.25, dispatch {mode}",
                    saved[name] / saved["dense"],
                    None,
                    None,
                    method=SAVED_METHOD,
                    note="cross-check; excludes parameters, input and gradients",
                )
            )
    return {"results": results, "ratios": ratios, "errors": errors}
