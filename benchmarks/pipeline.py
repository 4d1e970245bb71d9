"""Input-pipeline throughput: the V-MoE preprocessing vs a plain PIL decode-and-resize loop.

Usage::

    python -m benchmarks.pipeline                       # ~1 min on 2 cores
    python -m benchmarks.pipeline --update-readme README.md
    python -m benchmarks.pipeline --dry --out /tmp/x    # seconds: structure only (tests)

It writes ~400-px JPEGs (smooth gradients, edges and noise, quality 90) to a temporary folder and
reads them through ``torch.utils.data.DataLoader`` with 1 and 2 worker processes, batches of 32
uint8 ``(224, 224, 3)`` images. Contenders, each a map-style dataset over the files:

- ``plain``: ``PIL.Image.open(path).convert("RGB").resize((224, 224), BILINEAR)``;
- ``crop_flip``: :class:`visionmoe.data.ops.Transform` of ``InceptionCrop(224), FlipLR()``;
- ``crop_flip_randaug``: the same plus ``RandAugment(2, 10)`` (the light1 recipe).

Within each repeat the contenders run back to back (so a change in machine load hits all of them)
and every ratio is the median of per-repeat ratios; worker start-up is excluded (the clock starts
after the first batch). Targets: pipeline images/s per worker >= 0.9x the plain loop's with the
same number of workers, and 2 workers >= 1.6x one worker. Outputs ``pipeline.json`` and
``pipeline.md``; ``--update-readme`` rewrites the README block between the pipeline markers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from benchmarks.timing import env_info, load_average
from visionmoe.data.ops import FlipLR, InceptionCrop, RandAugment, Transform

START = "<!-- pipeline:start -->"
END = "<!-- pipeline:end -->"
CONTENDERS = ("plain", "crop_flip", "crop_flip_randaug")
RATIO_TARGET = 0.9
SCALING_TARGET = 1.6


def write_jpegs(folder: Path, count: int, long_side: int, seed: int = 0) -> list[Path]:
    """``count`` JPEGs about ``long_side`` px on the long side, landscape and portrait mixed."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        long = int(long_side * rng.uniform(0.85, 1.15))
        short = int(long * rng.uniform(0.66, 0.8))
        h, w = (short, long) if i % 2 == 0 else (long, short)
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([xs / w, ys / h, (xs + ys) / (w + h)], -1) * rng.uniform(120, 255, 3)
        disc = ((ys - h * rng.uniform(0.3, 0.7)) ** 2 + (xs - w * rng.uniform(0.3, 0.7)) ** 2) < (
            (0.2 * min(h, w)) ** 2
        )
        base[disc] = rng.uniform(0, 255, 3)
        pixels = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(pixels).save(path, format="JPEG", quality=90)
        paths.append(path)
    return paths


class Plain(Dataset):
    """Baseline: decode and resize with PIL only, no randomness."""

    def __init__(self, paths: Sequence[Path], size: int) -> None:
        self.paths, self.size = [str(p) for p in paths], size

    def __len__(self) -> int:
        return 1 << 30

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.paths[index % len(self.paths)]) as image:
            resized = image.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
        return torch.from_numpy(np.array(resized))


class Pipeline(Dataset):
    """The library's per-sample transform on the encoded file, seeded by the item index."""

    def __init__(self, paths: Sequence[Path], transform: Transform) -> None:
        self.paths, self.transform = [str(p) for p in paths], transform

    def __len__(self) -> int:
        return 1 << 30

    def __getitem__(self, index: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(index)
        return self.transform(self.paths[index % len(self.paths)], generator)


def datasets(paths: Sequence[Path], size: int) -> dict[str, Dataset]:
    crop_flip = (InceptionCrop(size=size), FlipLR())
    return {
        "plain": Plain(paths, size),
        "crop_flip": Pipeline(paths, Transform(ops=crop_flip)),
        "crop_flip_randaug": Pipeline(
            paths, Transform(ops=(*crop_flip, RandAugment(num_layers=2, magnitude=10)))
        ),
    }


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


def images_per_second(
    dataset: Dataset, workers: int, batch: int, seconds: float, offset: int
) -> float:
    """Steady-state images/s of a DataLoader over ``dataset`` (start-up excluded)."""
    loader = DataLoader(
        dataset,
        batch_size=batch,
        sampler=range(offset, offset + (1 << 20)),
        num_workers=workers,
        worker_init_fn=_one_thread if workers else None,
        prefetch_factor=2 if workers else None,
    )
    iterator = iter(loader)
    try:
        next(iterator)  # workers started and warm
        count, start = 0, time.perf_counter()
        while True:
            count += len(next(iterator))
            elapsed = time.perf_counter() - start
            if elapsed >= seconds and count >= 2 * batch:
                return count / elapsed
    finally:
        del iterator


def _spread(values: list[float]) -> dict:
    return {"value": statistics.median(values), "lo": min(values), "hi": max(values)}


def run(
    *,
    images: int,
    long_side: int,
    size: int,
    workers: Sequence[int],
    repeats: int,
    seconds: float,
    batch: int,
) -> dict:
    torch.set_num_threads(1)
    env = env_info(threads=1)
    started = time.perf_counter()
    samples: dict[str, dict[int, list[float]]] = {c: {w: [] for w in workers} for c in CONTENDERS}
    with tempfile.TemporaryDirectory(prefix="visionmoe-pipeline-") as tmp:
        paths = write_jpegs(Path(tmp), images, long_side)
        sets = datasets(paths, size)
        for repeat in range(repeats):
            for w in workers:
                for name in CONTENDERS:
                    offset = repeat * 100_003  # fresh random draws each repeat
                    rate = images_per_second(sets[name], w, batch, seconds, offset)
                    samples[name][w].append(rate)
    env["loadavg_end"] = load_average()
    rows = []
    for w in workers:
        for name in CONTENDERS[1:]:
            ratios = [a / b for a, b in zip(samples[name][w], samples["plain"][w], strict=True)]
            target = RATIO_TARGET if name == "crop_flip" else None
            rows.append(_row(f"{name} / plain images/s, {w} worker(s)", ratios, target))
    if len(workers) > 1 and min(workers) == 1:
        top = max(workers)
        for name in CONTENDERS:
            scaling = [a / b for a, b in zip(samples[name][top], samples[name][1], strict=True)]
            target = SCALING_TARGET if name != "plain" and top == 2 else None
            rows.append(_row(f"{name}: {top} workers / 1 worker images/s", scaling, target))
    return {
        "env": env,
        "config": {
            "images": images,
            "long_side": long_side,
            "size": size,
            "workers": list(workers),
            "repeats": repeats,
            "seconds": seconds,
            "batch": batch,
        },
        "images_per_s": {c: {str(w): _spread(v) for w, v in s.items()} for c, s in samples.items()},
        "ratios": rows,
        "runtime_s": time.perf_counter() - started,
    }


def _row(metric: str, values: list[float], target: float | None) -> dict:
    row = {"metric": metric, **_spread(values), "target": target}
    row["status"] = "info" if target is None else ("pass" if row["value"] >= target else "miss")
    return row


def _busy_note(result: dict) -> str:
    env = result["env"]
    load = (env.get("loadavg_start") or [0.0])[0]
    cpus = env.get("cpu_count") or 1
    if load <= 1.0:
        return ""
    return (
        f"Measured on a busy machine (1-min load average {load:.1f} at the start, {cpus} CPUs): "
        "absolute rates and the worker scaling are distorted; re-measure on a quiet machine."
    )


def render_table(result: dict) -> str:
    """Images/s per contender and worker count, then the ratios with targets."""
    workers = result["config"]["workers"]
    lines = [
        "| Contender | " + " | ".join(f"{w} worker(s), images/s" for w in workers) + " |",
        "|---|" + "---|" * len(workers),
    ]
    for name, per in result["images_per_s"].items():
        cells = [
            f"{per[str(w)]['value']:.0f} ({per[str(w)]['value'] / w:.0f}/worker)" for w in workers
        ]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    lines += ["", "| Ratio | Measured | Spread | Target | Status |", "|---|---|---|---|---|"]
    for row in result["ratios"]:
        target = "-" if row["target"] is None else f">= {row['target']}"
        status = "**miss**" if row["status"] == "miss" else row["status"]
        spread = f"{row['lo']:.2f} to {row['hi']:.2f}"
        lines.append(f"| {row['metric']} | {row['value']:.2f} | {spread} | {target} | {status} |")
    return "\n".join(lines)


def render_markdown(result: dict, details: bool = True) -> str:
    env, cfg = result["env"], result["config"]
    head = (
        f"Measured with `python -m benchmarks.pipeline` on {env['cpu_model']} "
        f"({env['cpu_count']} CPUs), torch {env['torch']}, {env['date']}: {cfg['images']} JPEGs "
        f"of ~{cfg['long_side']} px to {cfg['size']}x{cfg['size']}, batches of {cfg['batch']}, "
        f"median of {cfg['repeats']} interleaved repeats of {cfg['seconds']} s each."
    )
    parts = [head, "", _busy_note(result), "", render_table(result)]
    if details:
        parts = ["# Input pipeline throughput", "", *parts, "", __doc__.split("\n\n", 2)[2]]
    return "\n".join(p for p in parts if p is not None).replace("\n\n\n", "\n\n") + "\n"


def update_readme(readme: Path, result: dict) -> None:
    text = readme.read_text(encoding="utf-8")
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{readme}: markers {START} ... {END} not found (in that order)")
    section = render_markdown(result, details=False).strip("\n")
    readme.write_text(text[: start + len(START)] + "\n" + section + "\n" + text[end:], "utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pipeline", description=__doc__)
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--long-side", type=int, default=400)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--update-readme", type=Path, default=None, metavar="README")
    p.add_argument("--from-json", type=Path, default=None, help="re-render a saved result")
    p.add_argument("--dry", action="store_true", help="tiny and fast: checks the harness only")
    args = p.parse_args(argv)
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text(encoding="utf-8"))
    elif args.dry:
        result = run(images=4, long_side=48, size=16, workers=[1, 2], repeats=1, seconds=0.01,
                     batch=2)  # fmt: skip
        result["config"]["dry"] = True
    else:
        result = run(
            images=args.images,
            long_side=args.long_side,
            size=args.size,
            workers=args.workers,
            repeats=args.repeats,
            seconds=args.seconds,
            batch=args.batch,
        )
    if args.from_json is None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "pipeline.json").write_text(json.dumps(result, indent=2) + "\n", "utf-8")
        (args.out / "pipeline.md").write_text(render_markdown(result), "utf-8")
    print(render_markdown(result, details=False))
    if args.update_readme is not None:
        update_readme(args.update_readme, result)
        print(f"updated {args.update_readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
