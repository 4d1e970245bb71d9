"""Replace the README's performance block with the table rendered from a ``perf.json``.

Usage::

    python -m benchmarks.update_readme [--json benchmarks/results/perf.json] [--readme README.md]

Only the text between ``<!-- perf:start -->`` and ``<!-- perf:end -->`` changes (the markers stay),
so hand-written prose around the table survives every refresh.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from benchmarks.report import render_readme_section

START = "<!-- perf:start -->"
END = "<!-- perf:end -->"


def replace_section(text: str, section: str) -> str:
    """``text`` with everything between the markers replaced by ``section``."""
    start = text.find(START)
    end = text.find(END, start + len(START)) if start >= 0 else -1
    if start < 0 or end < 0:
        raise ValueError(f"markers {START} ... {END} not found (in that order)")
    return text[: start + len(START)] + "\n" + section.strip("\n") + "\n" + text[end:]


def update_readme(json_path: Path, readme_path: Path) -> None:
    """Rewrite ``readme_path`` in place from the results in ``json_path``."""
    result = json.loads(json_path.read_text(encoding="utf-8"))
    text = readme_path.read_text(encoding="utf-8")
    readme_path.write_text(replace_section(text, render_readme_section(result)), encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.update_readme", description=__doc__.splitlines()[0]
    )
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/perf.json"))
    p.add_argument("--readme", type=Path, default=Path("README.md"))
    args = p.parse_args(argv)
    update_readme(args.json, args.readme)
    print(f"updated {args.readme} from {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
