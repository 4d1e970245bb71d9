"""What every evaluation command shares: open any model, pick the data, prepare the images.

``visionmoe eval|sweep|inspect|fewshot|predict SOURCE [--data PATH] [--set KEY=VALUE ...]
[--batch-size N] [--image-size S] [--preset NAME]`` all become one :class:`EvalOptions`, and
:func:`open_for_eval` turns it into the model, its :class:`~visionmoe.loading.ModelInfo` and the
evaluation split, prepared with the model's evaluation preprocessing.

``--set`` keys: ``model.*`` (flat model options, e.g. ``model.capacity_factor=1.5``), ``data.*``
(:class:`~visionmoe.train.config.DataConfig` fields, e.g. ``data.kind=folder``) and
``preprocess.*`` (:class:`~visionmoe.loading.EvalPreprocess` fields, e.g.
``preprocess.resize_small=256`` or ``preprocess.resize_small=none``).
"""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from visionmoe.data import DATASET_KINDS, DatasetSplits, ImageDataset, to_model_input
from visionmoe.loading import EvalPreprocess, ModelInfo, load_model
from visionmoe.train.config import DataConfig, parse_model_options, parse_value
from visionmoe.train.inputs import TensorSplit, load_splits

EVAL_SECTIONS = ("model", "data", "preprocess")
DEFAULT_EVAL_BATCH_SIZE = 256


@dataclass(kw_only=True, frozen=True)
class EvalOptions:
    """Options shared by the evaluation commands (see the module docstring).

    ``data``: a dataset path (default: the run's own dataset; pretrained folders and vmoe
    checkpoints have none, so they need it). ``settings``: ``section.field=value`` strings.
    ``batch_size`` / ``image_size``: evaluation batch and input resolution (default: the run's
    eval batch size or 256, and the model's image size). ``preset``: vmoe checkpoints only.
    """

    data: str | None = None
    settings: tuple[str, ...] = ()
    batch_size: int | None = None
    image_size: int | None = None
    preset: str | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "image_size"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value > 0):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(kw_only=True, frozen=True)
class EvalSettings:
    """``--set`` strings sorted by section and parsed against each section's field types."""

    model: dict[str, Any]
    data: dict[str, Any]
    preprocess: dict[str, Any]


def parse_settings(items: tuple[str, ...] | list[str]) -> EvalSettings:
    """Typed ``model.* / data.* / preprocess.*`` settings; anything else is an error."""
    model: list[str] = []
    by_section: dict[str, dict[str, Any]] = {"data": {}, "preprocess": {}}
    types = {
        "data": typing.get_type_hints(DataConfig),
        "preprocess": typing.get_type_hints(EvalPreprocess),
    }
    for item in items:
        key, sep, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or section not in EVAL_SECTIONS:
            raise ValueError(
                f"setting {item!r} must look like SECTION.FIELD=VALUE with SECTION one of "
                f"{', '.join(EVAL_SECTIONS)}"
            )
        if section == "model":
            model.append(f"{name}={text}")
        elif name not in types[section]:
            raise ValueError(
                f"unknown setting {key!r}; {section} fields are {', '.join(types[section])}"
            )
        else:
            by_section[section][name] = parse_value(text, types[section][name], key)
    return EvalSettings(model=parse_model_options(model), **by_section)


def open_model(
    source: str | os.PathLike, options: EvalOptions, **model_overrides: Any
) -> tuple[nn.Module, ModelInfo]:
    """``load_model`` with the options' model settings, image size, preset and preprocessing."""
    settings = parse_settings(options.settings)
    overrides = {**settings.model, **model_overrides}
    if options.image_size is not None:
        overrides["image_size"] = options.image_size
    model, info = load_model(source, preset=options.preset, **overrides)
    if settings.preprocess:
        info = replace(info, preprocess=replace(info.preprocess, **settings.preprocess))
    return model, info


def eval_data_config(info: ModelInfo, options: EvalOptions) -> DataConfig:
    """The dataset to evaluate on: ``--data`` (kind from ``data.kind``, the run's or ``folder``),
    else the run's own dataset; a source without one and no ``--data`` is an error."""
    updates = parse_settings(options.settings).data
    own = info.experiment.data if info.experiment is not None else None
    if options.data is not None:
        kind = updates.pop("kind", None) or (own.kind if own and own.kind != "digits" else "folder")
        return DataConfig(**{**updates, "kind": kind, "path": options.data})
    if own is not None:
        return replace(own, **updates)
    if updates.get("kind") == "digits":
        return DataConfig(**updates)
    raise ValueError(
        f"'{info.source}' is a {info.kind} source with no dataset of its own; pass --data PATH "
        f"(and --set data.kind=KIND, one of {', '.join(DATASET_KINDS)}; default folder)"
    )


def prepare_images(images_NHWC: np.ndarray, info: ModelInfo, chunk: int = 1024) -> torch.Tensor:
    """uint8 images -> model input ``(N, C, S, S)`` in [-1, 1] with the model's preprocessing."""
    pre = info.preprocess
    parts = []
    for i in range(0, len(images_NHWC), chunk):
        batch = images_NHWC[i : i + chunk]
        if pre.resize_small is not None:
            batch = _resize_small_crop(batch, pre.resize_small, pre.size)
        parts.append(to_model_input(batch, pre.size, info.in_chans))
    if not parts:
        return torch.empty(0, info.in_chans, pre.size, pre.size)
    return torch.cat(parts)


def _resize_small_crop(images_NHWC: np.ndarray, small: int, crop: int) -> torch.Tensor:
    """Shorter side to ``small`` (area averaging, aspect kept), then a central ``crop`` window."""
    x = torch.from_numpy(np.ascontiguousarray(images_NHWC)).permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    factor = small / min(h, w)
    x = F.interpolate(x, size=(round(h * factor), round(w * factor)), mode="area")
    top, left = (x.shape[-2] - crop) // 2, (x.shape[-1] - crop) // 2
    x = x[..., top : top + crop, left : left + crop]
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def prepare_split(dataset: ImageDataset, info: ModelInfo) -> TensorSplit:
    return TensorSplit(
        prepare_images(dataset.images, info),
        torch.as_tensor(dataset.labels, dtype=torch.long),
        dataset.images,
    )


@dataclass
class EvalInputs:
    """An opened model with the data to evaluate it on."""

    model: nn.Module
    info: ModelInfo
    data: DataConfig
    splits: DatasetSplits
    test: TensorSplit
    batch_size: int


def open_for_eval(
    source: str | os.PathLike, options: EvalOptions | None = None, **model_overrides: Any
) -> EvalInputs:
    """The model at ``source``, its evaluation split (prepared) and the batch size to use."""
    options = options or EvalOptions()
    model, info = open_model(source, options, **model_overrides)
    if info.experiment is not None and info.experiment.text is not None:
        raise ValueError(
            f"'{source}' is an image-text (LIMoE) model, not a classifier; evaluate it with "
            f"visionmoe zeroshot {source}"
        )
    data = eval_data_config(info, options)
    splits = load_splits(data)
    if splits.test.num_classes > info.num_classes:
        raise ValueError(
            f"dataset '{data.path or data.kind}' has {splits.test.num_classes} classes but the "
            f"model '{source}' predicts {info.num_classes}"
        )
    batch_size = options.batch_size or (
        info.experiment.train.eval_batch_size if info.experiment else DEFAULT_EVAL_BATCH_SIZE
    )
    return EvalInputs(
        model=model,
        info=info,
        data=data,
        splits=splits,
        test=prepare_split(splits.test, info),
        batch_size=batch_size,
    )


def default_out_dir(source: str | os.PathLike, name: str) -> Path:
    """``SOURCE/name`` for a directory source, ``PREFIX_name`` beside a vmoe checkpoint prefix."""
    path = Path(source)
    return path / name if path.is_dir() else path.with_name(f"{path.name}_{name}")


def describe(info: ModelInfo) -> dict[str, Any]:
    """JSON-able facts about the evaluated model, added to every evaluation result."""
    return {
        "source": info.source,
        "source_kind": info.kind,
        "image_size": info.image_size,
        "preprocess": info.preprocess.describe(),
    }
