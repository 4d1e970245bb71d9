"""Open any model the library can read: a run, a checkpoint, a pretrained folder or a vmoe prefix.

Every command and Python entry point that takes a model goes through :func:`load_model`, so they
all accept the same sources and fail with the same one-line message on anything else.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionmoe.convert.vmoe_params import load_vmoe
from visionmoe.hub import CONFIG_NAME, WEIGHTS_NAME, from_pretrained
from visionmoe.loading.record import EvalPreprocess, LoadedModel, ModelInfo
from visionmoe.models.limoe import LIMoE
from visionmoe.models.registry import apply_overrides
from visionmoe.models.vit import VisionTransformer
from visionmoe.train.checkpoint import load_checkpoint
from visionmoe.train.config import ExperimentConfig
from visionmoe.train.finetune import load_init_weights

ACCEPTED_SOURCES = (
    "a run directory (checkpoints/latest), a checkpoint directory (meta.json), a "
    "save_pretrained folder (config.json + model.safetensors) or a vmoe checkpoint prefix "
    "(PREFIX.index next to PREFIX.data-*)"
)
# Keys a save_pretrained config.json may carry besides the model config (see save_pretrained's
# ``extra``): the class names and the evaluation preprocessing of the model.
CLASS_NAMES_KEY = "class_names"
PREPROCESS_KEY = "eval_preprocess"


class SourceError(ValueError):
    """A path that is none of the model sources ``load_model`` accepts."""


def _vmoe_prefix(source: str | os.PathLike) -> str | None:
    text = os.fspath(source)
    text = text.removesuffix(".index")
    return text if Path(f"{text}.index").is_file() else None


def detect_source(source: str | os.PathLike) -> str:
    """The kind of model source at ``source`` (one of ``SOURCE_KINDS``), or ``SourceError``."""
    path = Path(source)
    if path.is_dir():
        if (path / "meta.json").is_file():
            return "checkpoint"
        if (path / "checkpoints" / "latest").is_file() or (path / "latest").is_file():
            return "run"
        if (path / WEIGHTS_NAME).is_file() and (path / CONFIG_NAME).is_file():
            return "pretrained"
    if _vmoe_prefix(source) is not None:
        return "vmoe"
    if not path.exists():
        problem = "nothing there"
    elif path.is_dir():
        problem = "a directory holding none of them"
    else:
        problem = "a file, not one of them"
    raise SourceError(f"cannot open model '{source}' ({problem}); expected {ACCEPTED_SOURCES}")


def build_model(config: ExperimentConfig) -> nn.Module:
    """The model a training config describes: a LIMoE when ``config.text`` is set, else a ViT."""
    if config.text is not None:
        return LIMoE(config.model, config.text)
    return VisionTransformer(config.model)


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor], adapt: bool) -> None:
    """Strict load; with ``adapt`` (overrides given) a ViT gets a new head / resized pos-emb."""
    if adapt and isinstance(model, VisionTransformer):
        load_init_weights(model, state)
    else:
        model.load_state_dict(state)


def _class_names(names: Any, num_classes: int) -> tuple[str, ...]:
    if isinstance(names, list) and len(names) == num_classes:
        return tuple(str(n) for n in names)
    return tuple(str(i) for i in range(num_classes))


def _run_class_names(checkpoint: Path) -> Any:
    for candidate in (checkpoint.parent.parent / "classes.json", checkpoint / "classes.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return None


def _open_checkpoint(source, kind: str, overrides: dict[str, Any]) -> tuple[nn.Module, dict]:
    ckpt = load_checkpoint(source)
    config = ExperimentConfig.from_dict(ckpt["meta"]["config"])
    if overrides:
        config = ExperimentConfig(
            **{**config.__dict__, "model": apply_overrides(config.model, **overrides)}
        )
    model = build_model(config)
    _load_weights(model, ckpt["model"], adapt=bool(overrides))
    names = _run_class_names(ckpt["path"])
    return model, {
        "experiment": config,
        "model_config": config.model,
        "class_names": _class_names(names, config.model.num_classes),
        # Runs trained on square-resized images; evaluate them the same way.
        "preprocess": EvalPreprocess(size=config.model.image_size, pipeline="training"),
        "checkpoint": ckpt["path"],
        "step": ckpt["meta"].get("step"),
    }


def _open_pretrained(source, overrides: dict[str, Any]) -> tuple[nn.Module, dict]:
    model = from_pretrained(source, **overrides)
    stored = json.loads((Path(source) / CONFIG_NAME).read_text())
    preprocess = EvalPreprocess.vmoe_default(model.config.image_size)
    saved = stored.get(PREPROCESS_KEY)
    if isinstance(saved, dict) and "image_size" not in overrides:
        preprocess = EvalPreprocess(**saved)
    return model, {
        "class_names": _class_names(stored.get(CLASS_NAMES_KEY), model.config.num_classes),
        "preprocess": preprocess,
    }


def _open_vmoe(prefix: str, preset: str | None, overrides: dict[str, Any]):
    model = load_vmoe(prefix, preset, **overrides)
    return model, {
        "class_names": _class_names(None, model.config.num_classes),
        "preprocess": EvalPreprocess.vmoe_default(model.config.image_size),
    }


def load_model(
    source: str | os.PathLike,
    *,
    preset: str | None = None,
    preprocess: EvalPreprocess | None = None,
    **overrides: Any,
) -> LoadedModel:
    """Open the model at ``source`` (eval mode) and say what is known about it.

    ``source`` is a run directory, a checkpoint directory (``checkpoints/step_N``), a
    ``save_pretrained`` folder or an official vmoe checkpoint prefix (``PREFIX.index`` present).
    ``overrides`` are flat ViT/MoE options (``capacity_factor=1.5``, ``image_size=384``, ...)
    applied before the weights load; a changed ``image_size`` resizes the position embedding, a
    changed ``num_classes`` gives a new head. ``preset`` names a vmoe preset (vmoe prefixes only;
    see ``visionmoe.convert.VMOE_PRESETS``). ``preprocess`` replaces the evaluation preprocessing
    recorded for the model.

    Example: ``model, info = load_model("runs/digits_vmoe-...")``.

    Raises:
      SourceError: ``source`` is none of the accepted kinds (one line naming the path).
      ValueError: the source is of a known kind but unreadable, or the overrides do not fit.
    """
    kind = detect_source(source)
    if preset is not None and kind != "vmoe":
        raise ValueError(
            f"a preset applies to vmoe checkpoint prefixes only; '{source}' is a {kind}"
        )
    if kind in ("run", "checkpoint"):
        model, known = _open_checkpoint(source, kind, overrides)
    elif kind == "pretrained":
        model, known = _open_pretrained(source, overrides)
    else:
        model, known = _open_vmoe(_vmoe_prefix(source), preset, overrides)
    if preprocess is not None:
        known["preprocess"] = preprocess
    known.setdefault("model_config", model.config)
    info = ModelInfo(source=os.fspath(source), kind=kind, **known)
    return LoadedModel(model.eval(), info)


def load_state(source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights at ``source`` (any kind ``load_model`` opens), as a state dict."""
    if detect_source(source) in ("run", "checkpoint"):
        return load_checkpoint(source)["model"]
    return load_model(source).model.state_dict()


def source_experiment(source: str | os.PathLike) -> ExperimentConfig | None:
    """The training config stored with ``source`` (runs and checkpoints), else None."""
    if detect_source(source) not in ("run", "checkpoint"):
        return None
    saved = Path(source) / "config.json"
    if saved.is_file() and not (Path(source) / "meta.json").is_file():
        return ExperimentConfig.from_dict(json.loads(saved.read_text()))
    return ExperimentConfig.from_dict(load_checkpoint(source)["meta"]["config"])
