"""Command-line entry points of the converters (argument parsing lives in ``visionmoe.cli``).

Each writes a :func:`visionmoe.hub.save_pretrained` folder, the library's portable model format,
plus ``conversion.json`` so the provenance and any adaptation of the weights stay next to them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from visionmoe.convert.dense_vit import load_dense_vit
from visionmoe.convert.vmoe_params import load_vmoe
from visionmoe.hub import save_pretrained
from visionmoe.train.checkpoint import atomic_write_text

REPORT_NAME = "conversion.json"


def _write(model, report, out_dir: str | os.PathLike, info: dict[str, Any]) -> Path:
    out = save_pretrained(model, out_dir)
    record = {**info, "report": report.to_dict()}
    atomic_write_text(out / REPORT_NAME, json.dumps(record, indent=2, sort_keys=True, default=str))
    return out


def convert_vmoe_cli(
    prefix: str | os.PathLike,
    out_dir: str | os.PathLike,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Convert a released vmoe checkpoint (``<prefix>.index`` + shards) into ``out_dir``.

    ``overrides`` are flat model options (e.g. ``{"eval_capacity_factor": 1.05}``). Returns the
    output folder, loadable with :func:`visionmoe.hub.from_pretrained`.
    """
    overrides = dict(overrides or {})
    model, report = load_vmoe(prefix, preset, return_report=True, **overrides)
    info = {"source": os.fspath(prefix), "format": "vmoe", "preset": preset, "overrides": overrides}
    return _write(model, report, out_dir, info)


def convert_dense_cli(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    format: str = "auto",
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Convert timm / Hugging Face / big_vision ViT weights into ``out_dir`` (see above)."""
    overrides = dict(overrides or {})
    model, report = load_dense_vit(path, format, **overrides)
    info = {"source": os.fspath(path), "format": format, "overrides": overrides}
    return _write(model, report, out_dir, info)
