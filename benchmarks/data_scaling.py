"""Peak memory and wall time of ``visionmoe train`` on an image folder of N and 10 N images.

Nothing is decoded ahead of need, so training the same number of steps on a folder ten times
larger should cost about the same memory and time (targets: peak RSS within 25 %, wall time within
50 %).  The benchmark writes two ImageNet-layout folders of small JPEGs of varied sizes
(``train/<class>/*.JPEG``; ``val/`` has the same fixed size in both, since evaluating a larger
validation split is work that rightly grows), runs the same ``visionmoe train --recipe
digits_vmoe --set data.kind=folder`` command on each in a subprocess, and samples the process
tree every 50 ms:

- ``peak_rss_main_mb``: the training process's own peak resident set (``VmHWM``);
- ``peak_pss_tree_mb``: the peak over time of the summed proportional set size (``Pss``) of the
  process and its DataLoader workers (PSS splits shared pages between processes, so forked
  workers' shared libraries are not counted several times).

    python -m benchmarks.data_scaling                    # N = 500, 60 steps, 3 repeats
    python -m benchmarks.data_scaling --n 200 --steps 20 --repeats 1  # quick

The two sizes alternate within each repeat (N, 10 N, N, 10 N, ...) so a change in machine load
lands on both; the table reports the median over repeats of each measure.

Outputs ``benchmarks/results/data_scaling.json`` and ``.md``.  On a busy machine the wall times
are noisy; the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
RSS_TARGET, WALL_TARGET = 0.25, 0.50
CLASSES = 10
VAL_IMAGES = 200


def write_folder(root: Path, train_images: int, seed: int = 0) -> None:
    """``train/`` with ``train_images`` and ``val/`` with ``VAL_IMAGES`` JPEGs of 24-96 px."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", train_images), ("val", VAL_IMAGES)):
        for i in range(count):
            label = i % CLASSES
            folder = root / split / f"n{label:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            h, w = (int(v) for v in rng.integers(24, 97, 2))
            pixels = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
            pixels[..., label % 3] += np.uint8(17 * label)  # a class-dependent tint
            Image.fromarray(pixels).save(folder / f"{split}_{i:07d}.JPEG", quality=85)


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            children = []
        todo.extend(int(c) for c in children)
    return out


def measure_train(folder: Path, run_dir: Path, steps: int, workers: int | None) -> dict:
    """Run ``visionmoe train`` on ``folder``; wall time, peak RSS (main) and peak PSS (tree)."""
    overrides = [
        "data.kind=folder",
        f"train.steps={steps}",
        f"train.eval_every={steps}",
        f"train.checkpoint_every={steps}",
        "train.threads=1",
    ]
    if workers is not None:
        overrides.append(f"data.num_workers={workers}")
    cmd = [
        sys.executable,
        "-m",
        "visionmoe",
        "train",
        "--recipe",
        "digits_vmoe",
        "--data",
        str(folder),
        "--no-progress",
        "--run-dir",
        str(run_dir),
        "--set",
        *overrides,
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_hwm = peak_pss = 0
    while proc.poll() is None:
        peak_hwm = max(peak_hwm, _status_kb(proc.pid, "VmHWM"))
        peak_pss = max(peak_pss, sum(_pss_kb(p) for p in _tree(proc.pid)))
        time.sleep(0.05)
    wall = time.perf_counter() - start
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"visionmoe train failed ({proc.returncode}): {err.strip()[-500:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "wall_s": wall,
        "train_loop_s": summary["train_seconds_this_session"],
        "peak_rss_main_mb": peak_hwm / 1024,
        "peak_pss_tree_mb": peak_pss / 1024,
        "test_accuracy": summary["test_accuracy"],
    }


def render(result: dict) -> str:
    small, large = result["runs"]
    rows = [
        "| Measure | N = {n} | 10 N = {n10} | 10 N / N | Target | Met |".format(
            n=small["train_images"], n10=large["train_images"]
        ),
        "|---|---|---|---|---|---|",
    ]
    for key, label, target in (
        ("peak_rss_main_mb", "peak RSS, training process (MB)", RSS_TARGET),
        ("peak_pss_tree_mb", "peak PSS, process + workers (MB)", RSS_TARGET),
        ("wall_s", "wall time of the command (s)", WALL_TARGET),
        ("train_loop_s", "time in the training loop (s)", WALL_TARGET),
    ):
        ratio = large[key] / small[key]
        met = "yes" if abs(ratio - 1) <= target else "no"
        rows.append(
            f"| {label} | {small[key]:.1f} | {large[key]:.1f} | {ratio:.2f} | "
            f"within {target:.0%} | {met} |"
        )
    env = result["environment"]
    return "\n".join(
        [
            "# Data pipeline scaling: `visionmoe train` on N vs 10 N images",
            "",
            f"{result['steps']} steps of `digits_vmoe` (batch 64) on an ImageNet-layout folder of "
            f"JPEGs of 24-96 px, {VAL_IMAGES} validation images in both; DataLoader workers: "
            f"{result['workers'] if result['workers'] is not None else 'automatic'}; "
            f"median of {result['repeats']} alternating repeats.",
            "",
            *rows,
            "",
            f"Machine: {env['cpus']} CPUs, load average before/after {env['load_before']} / "
            f"{env['load_after']}; {env['python']}, {env['platform']}. "
            "Wall times on a shared machine are noisy.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=500, help="train images of the small folder")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--workers", type=int, default=None, help="data.num_workers (auto)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    load_before = [round(v, 2) for v in os.getloadavg()]
    counts = (args.n, 10 * args.n)
    samples: dict[int, list[dict]] = {count: [] for count in counts}
    with tempfile.TemporaryDirectory(prefix="data_scaling_") as tmp:
        for count in counts:
            write_folder(Path(tmp) / f"images_{count}", count)
        for repeat in range(args.repeats):
            for count in counts:
                run_dir = Path(tmp) / f"run_{count}_{repeat}"
                record = measure_train(
                    Path(tmp) / f"images_{count}", run_dir, args.steps, args.workers
                )
                samples[count].append(record)
                print(json.dumps({"train_images": count, "repeat": repeat, **record}), flush=True)
    runs = [
        {
            "train_images": count,
            **{key: statistics.median(r[key] for r in samples[count]) for key in samples[count][0]},
            "samples": samples[count],
        }
        for count in counts
    ]
    result = {
        "steps": args.steps,
        "workers": args.workers,
        "repeats": args.repeats,
        "runs": runs,
        "targets": {"rss_within": RSS_TARGET, "wall_within": WALL_TARGET},
        "environment": {
            "cpus": os.cpu_count(),
            "load_before": load_before,
            "load_after": [round(v, 2) for v in os.getloadavg()],
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "data_scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    markdown = render(result)
    (args.out / "data_scaling.md").write_text(markdown)
    print(markdown)
    return result


if __name__ == "__main__":
    main()
