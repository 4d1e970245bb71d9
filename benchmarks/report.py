"""Render benchmark results (the ``perf.json`` dict) as markdown: full report and README section.

Kept free of torch imports so the README can be regenerated from a saved JSON anywhere.
"""

from __future__ import annotations

from benchmarks.profile import render_profiles

FAMILY_TITLES = {
    "layer": "1. MoE layer vs dense FFN (equal active FLOPs)",
    "peers": "2. vs peer libraries",
    "bpr": "3. Inference with BPR",
    "gemm": "4. Expert GEMM efficiency",
    "memory": "5. Peak memory",
    "model": "6. Whole model",
    "compile": "7. torch.compile",
}
STATUS_MARK = {"pass": "pass", "miss": "**miss**", "info": "info", "error": "error"}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _cell(text: str) -> str:
    """Table-safe text: pipes would split the cell, newlines would end the row."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _spread(row: dict) -> str:
    if row.get("lo") is None or row.get("hi") is None:
        return ""
    return f"{_fmt(row['lo'])} to {_fmt(row['hi'])}"


def render_table(result: dict, details: bool = True) -> str:
    """One markdown table with every ratio: value, spread, target, status (and method, notes)."""
    head = ["Metric", "Measured", "Spread", "Target", "Status"]
    if details:
        head.append("Method / notes")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result.get("ratios", []):
        cells = [
            _cell(row["metric"]),
            _fmt(row["value"]),
            _spread(row),
            _cell(row["target"] or "-"),
            STATUS_MARK.get(row["status"], row["status"]),
        ]
        if details:
            notes = [n for n in (row.get("method"), row.get("note"), row.get("error")) if n]
            cells.append(_cell("; ".join(notes)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _summary_line(result: dict) -> str:
    counts: dict[str, int] = {}
    for row in result.get("ratios", []):
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    order = ("pass", "miss", "error", "info")
    return ", ".join(f"{counts[s]} {s}" for s in order if s in counts)


def _env_line(result: dict) -> str:
    env, cfg = result.get("env", {}), result.get("config", {})
    precisions = ", ".join(cfg.get("precisions", ["float32"]))
    layer_e = cfg.get("layer_experts")
    experts = f"E={cfg.get('experts', '?')}" + (
        f" (layer family: E in {{{', '.join(str(e) for e in layer_e)}}})" if layer_e else ""
    )
    group = cfg.get("group_size")
    groups = "one routing group" if group is None else f"routing groups of {group} tokens"
    thp = " THP_MEM_ALLOC_ENABLE=1," if env.get("thp_mem_alloc") == "1" else ""
    alloc = f" CPU allocator: {env['cpu_allocator']}," if env.get("cpu_allocator") else ""
    return (
        f"{env.get('cpu_model', '?')}, {cfg.get('threads', '?')} threads,{thp}{alloc} torch "
        f"{env.get('torch', '?')}, {precisions}, {env.get('date', '?')}; "
        f"T={cfg.get('tokens', '?')} tokens, {groups}, D={cfg.get('dim', '?')}, "
        f"F={cfg.get('hidden', '?')}, {experts}; "
        f"median of {cfg.get('repeats', '?')} interleaved repeats"
        + (" (--quick)" if cfg.get("quick") else "")
    )


def load_warning(result: dict) -> str:
    """A warning when other processes were using the CPUs during the run, else ``""``.

    Our own threads add to the load average only once the run is going, so the 1-minute value at
    the start shows foreign load. On busy cores, oversubscribed thread pools make every parallel
    op pay a scheduling delay, which inflates contenders made of many small ops far more than
    those made of a few large GEMMs: ratios, not just absolute times, are distorted.
    """
    env = result.get("env", {})
    start, end = env.get("loadavg_start"), env.get("loadavg_end")
    if not start:
        return ""
    cpus, threads = env.get("cpu_count") or 1, env.get("threads") or 1
    spare = max(cpus - threads, 0)
    if start[0] <= spare + 1.0:
        return ""
    end_txt = f", {end[0]:.1f} at the end" if end else ""
    return (
        f"**Warning: the machine was busy** (1-min load average {start[0]:.1f} at the start"
        f"{end_txt}, {cpus} CPUs, {threads} benchmark threads): ratios are distorted; "
        "re-measure on a quiet machine."
    )


def _load_line(result: dict) -> str:
    env = result.get("env", {})
    start, end = (_first(env.get(k)) for k in ("loadavg_start", "loadavg_end"))
    return f"1-min load average: {start} at the start, {end} at the end."


def _first(load: list[float] | None) -> str:
    return "?" if not load else f"{load[0]:.2f}"


def render_markdown(result: dict) -> str:
    """The full ``perf.md``: environment, the ratio table, absolute times, errors."""
    out = [
        "# visionmoe performance",
        "",
        _env_line(result),
        "",
        f"Result: {_summary_line(result)}. Run time {result.get('runtime_s', 0):.0f} s.",
        "",
        _load_line(result),
        "",
        load_warning(result),
        "",
        "Ratios are medians of per-repeat ratios (contenders alternate within each repeat); "
        "the spread is the min to max of those per-repeat ratios.",
        "",
        render_table(result, details=True),
    ]
    times = _absolute_times(result)
    if times:
        out += ["", "## Absolute medians", "", times]
    profiles = result.get("results", {}).get("profile")
    if profiles:
        out += ["", "## Where the time goes (torch.profiler)", "", render_profiles(profiles)]
    errors = {
        f"{family}.{name}": msg
        for family, errs in result.get("errors", {}).items()
        for name, msg in (errs or {}).items()
    }
    if errors:
        out += ["", "## Errors", ""]
        out += [f"- `{k}`: {_cell(v)}" for k, v in sorted(errors.items())]
    return "\n".join(out) + "\n"


def _absolute_times(result: dict) -> str:
    """``section / contender: median s`` for every timed contender (in ms)."""
    lines = ["| Section | Contender | Median (ms) | Min to max (ms) |", "|---|---|---|---|"]
    found = False
    for family, sections in result.get("results", {}).items():
        for section, data in (sections or {}).items():
            for key, value in data.items():
                if not (key == "times_s" or key.endswith("_times_s")):
                    continue
                for name, stats in value.items():
                    found = True
                    label = f"{family}.{section}" + ("" if key == "times_s" else f".{key[:-8]}")
                    lines.append(
                        f"| {label} | {name} | {stats['median'] * 1e3:.1f} | "
                        f"{stats['min'] * 1e3:.1f} to {stats['max'] * 1e3:.1f} |"
                    )
    return "\n".join(lines) if found else ""


def render_readme_section(result: dict) -> str:
    """The README block: one line on where/how measured, the table, how to reproduce."""
    lines = [
        f"Measured with `python -m benchmarks.run` on {_env_line(result)}. {_summary_line(result)}."
    ]
    warning = load_warning(result)
    if warning:
        lines += ["", warning]
    lines += [
        "",
        render_table(result, details=False),
        "",
        "Full report with methods and absolute times: `benchmarks/results/perf.md`; "
        "refresh this table with `python -m benchmarks.update_readme`.",
    ]
    return "\n".join(lines)
