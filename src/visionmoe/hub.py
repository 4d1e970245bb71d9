"""Save and load models as self-describing folders (the Hugging Face Hub layout), offline.

A folder holds ``model.safetensors`` (weights) and ``config.json`` (the :class:`ViTConfig` plus
``model_type`` / ``library`` / version tags), so it can be uploaded to a model hub as is, read by
any safetensors tool, and rebuilt here without the training run it came from. Nothing is pickled,
both files are replaced atomically, and loading never touches the network.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from visionmoe.models.config import MoEConfig, ViTConfig
from visionmoe.models.registry import apply_overrides
from visionmoe.models.vit import VisionTransformer
from visionmoe.train.checkpoint import atomic_write_text
from visionmoe.train.finetune import load_init_weights
from visionmoe.version import __version__

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
MODEL_TYPE = "visionmoe_vit"
HUB_FORMAT_VERSION = 1


class PretrainedError(ValueError):
    """A pretrained folder that is missing, incomplete or not a visionmoe model."""


def save_pretrained(
    model: VisionTransformer, directory: str | os.PathLike, extra: dict[str, Any] | None = None
) -> Path:
    """Write ``model`` to ``directory`` (created if needed) as weights + config; returns it.

    ``extra`` adds JSON-able fields to ``config.json`` (e.g. provenance); they are ignored when
    loading. The weights are written first, so a folder with a config always has its weights.
    """
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"save_pretrained expects a VisionTransformer, got {type(model).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{WEIGHTS_NAME}.")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, directory / WEIGHTS_NAME)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    config = {
        **model.config.to_dict(),
        "model_type": MODEL_TYPE,
        "library": "visionmoe",
        "visionmoe_version": __version__,
        "format_version": HUB_FORMAT_VERSION,
        **(extra or {}),
    }
    atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True))
    return directory


def load_config(directory: str | os.PathLike) -> ViTConfig:
    """The :class:`ViTConfig` stored in a pretrained folder."""
    path = Path(directory) / CONFIG_NAME
    if not Path(directory).is_dir():
        raise PretrainedError(f"no pretrained model folder at '{directory}'")
    if not path.is_file():
        raise PretrainedError(
            f"'{directory}' has no {CONFIG_NAME}; expected a save_pretrained folder"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PretrainedError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict) or data.get("model_type") != MODEL_TYPE:
        found = data.get("model_type") if isinstance(data, dict) else None
        raise PretrainedError(f"{path} describes model_type {found!r}, not {MODEL_TYPE!r}")
    if data.get("format_version", HUB_FORMAT_VERSION) > HUB_FORMAT_VERSION:
        raise PretrainedError(
            f"{path} has format_version {data['format_version']}, newer than this visionmoe "
            f"reads ({HUB_FORMAT_VERSION}); upgrade visionmoe"
        )
    known = {f.name for f in fields(ViTConfig)}
    config = {k: v for k, v in data.items() if k in known}
    if isinstance(config.get("moe"), dict):
        moe_known = {f.name for f in fields(MoEConfig)}
        config["moe"] = {k: v for k, v in config["moe"].items() if k in moe_known}
    try:
        return ViTConfig.from_dict(config)
    except (TypeError, ValueError) as err:
        raise PretrainedError(f"{path} holds an invalid model config: {err}") from None


def from_pretrained(directory: str | os.PathLike, **overrides: Any) -> VisionTransformer:
    """Rebuild a model saved by :func:`save_pretrained` (eval mode).

    ``overrides`` are flat ViT/MoE options (``capacity_factor``, ``num_classes``, ``image_size``,
    ...). A different ``num_classes`` gives a new zero-initialised head and a different
    ``image_size`` resizes the learned position embedding, as for fine-tuning.
    """
    config = load_config(directory)
    if overrides:
        config = apply_overrides(config, **overrides)
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise PretrainedError(f"'{directory}' has no {WEIGHTS_NAME} (the model weights)")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise PretrainedError(f"cannot read {weights} (truncated or corrupted?): {err}") from None
    model = VisionTransformer(config)
    if overrides:
        load_init_weights(model, state)  # new head / resized position embedding where asked
        return model.eval()
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise PretrainedError(f"{weights} does not match {CONFIG_NAME}: {err}") from None
    if missing or unexpected:
        raise PretrainedError(
            f"{weights} does not match {CONFIG_NAME}: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    return model.eval()
