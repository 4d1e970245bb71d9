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
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from visionmoe.data import (
    DATASET_KINDS,
    DatasetError,
    DatasetSplits,
    EvalBatches,
    ImageDataset,
    ImageSource,
    SampleTransform,
    eval_indices,
    make_loader,
    to_model_input,
)
from visionmoe.data.loader import read_batch
from visionmoe.data.ops import Transform, eval_ops
from visionmoe.loading import EvalPreprocess, ModelInfo, load_model
from visionmoe.runtime import check_precision, place_model
from visionmoe.train.config import DataConfig, parse_model_options, parse_value
from visionmoe.train.inputs import load_splits, num_workers
from visionmoe.train.inputs import sample_transform as training_transform

EVAL_SECTIONS = ("model", "data", "preprocess")
DEFAULT_EVAL_BATCH_SIZE = 256


@dataclass(kw_only=True, frozen=True)
class EvalOptions:
    """Options shared by the evaluation commands (see the module docstring).

    ``data``: a dataset path (default: the run's own dataset; pretrained folders and vmoe
    checkpoints have none, so they need it). ``settings``: ``section.field=value`` strings.
    ``batch_size`` / ``image_size``: evaluation batch and input resolution (default: the run's
    eval batch size or 256, and the model's image size). ``preset``: vmoe checkpoints only.
    ``device``: ``cpu``, ``cuda`` or ``cuda:N`` (default: CUDA when available, else CPU);
    ``precision``: ``fp32`` or ``bf16`` (autocast; routers stay float32).
    """

    data: str | None = None
    settings: tuple[str, ...] = ()
    batch_size: int | None = None
    image_size: int | None = None
    preset: str | None = None
    device: str | None = None
    precision: str = "fp32"

    def __post_init__(self) -> None:
        check_precision(self.precision)
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
    model, _ = place_model(model, options.device)
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


def eval_transform(source: ImageSource, info: ModelInfo) -> SampleTransform | None:
    """How each sample of ``source`` is prepared for the model ``info`` describes."""
    pre = info.preprocess
    if pre.pipeline == "training":  # as the run evaluated itself, its preprocess section included
        run_preprocess = info.experiment.preprocess if info.experiment is not None else None
        model = replace(info.model_config, image_size=pre.size)
        return training_transform(source, model, run_preprocess)
    return Transform(ops=eval_ops(pre.size, pre.resize_small))


def prepare_image(image_HWC: np.ndarray, info: ModelInfo) -> torch.Tensor:
    """One uint8 image -> model input ``(1, C, S, S)`` with the model's preprocessing."""
    pre = info.preprocess
    if pre.pipeline == "vmoe":
        transform = Transform(ops=eval_ops(pre.size, pre.resize_small))
        image_HWC = transform(image_HWC, torch.Generator())  # deterministic ops: no draws
    return to_model_input(image_HWC[None], pre.size, info.in_chans)


@dataclass
class EvalInputs:
    """An opened model with the data to evaluate it on, streamed in the seeded eval order."""

    model: nn.Module
    info: ModelInfo
    data: DataConfig
    splits: DatasetSplits
    batch_size: int
    seed: int = 0

    def batches(
        self, source: ImageSource | None = None, seed: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Model-ready ``(x, y)`` batches of ``source`` (default: the test split)."""
        source = self.splits.test if source is None else source
        dataset = EvalBatches(
            source,
            self.batch_size,
            self.seed if seed is None else seed,
            transform=eval_transform(source, self.info),
            strict=self.data.strict,
        )
        loader = make_loader(
            dataset,
            range(len(dataset)),
            num_workers=num_workers(self.data, source),
            prefetch=self.data.prefetch,
            timeout_s=self.data.worker_timeout_s,
        )
        size, channels = self.info.preprocess.size, self.info.in_chans
        for batch in loader:
            yield to_model_input(batch["images"], size, channels), batch["labels"]

    def images(self, source: ImageSource | None = None, limit: int | None = None) -> ImageDataset:
        """Up to ``limit`` prepared uint8 images (``size x size``) in memory, for reports; the
        first ones of the seeded evaluation order, so a class-sorted folder gives every class."""
        source = self.splits.test if source is None else source
        indices = eval_indices(len(source), self.seed)[:limit]
        batch = read_batch(
            source, indices, indices, (self.seed, 0), eval_transform(source, self.info), False
        )
        if "error" in batch:
            raise DatasetError(batch["error"])
        images = batch["images"].numpy()
        if images.shape[1] != self.info.preprocess.size:  # in-memory data, resized on the device
            x = to_model_input(images, self.info.preprocess.size, images.shape[-1])
            images = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
            images = images.numpy()
        return ImageDataset(images, batch["labels"].numpy(), list(source.class_names))


def open_for_eval(
    source: str | os.PathLike,
    options: EvalOptions | None = None,
    *,
    classifier: bool = True,
    **model_overrides: Any,
) -> EvalInputs:
    """The model at ``source``, its evaluation data and the batch size to use.

    ``classifier``: the model's logits are scored against the labels, so the dataset may not
    have more classes than the model (False for probes on frozen features).
    """
    options = options or EvalOptions()
    model, info = open_model(source, options, **model_overrides)
    return with_data(model, info, options, classifier=classifier)


def with_data(
    model: nn.Module, info: ModelInfo, options: EvalOptions, *, classifier: bool = True
) -> EvalInputs:
    """An opened model with the evaluation data ``options`` name (see :func:`open_for_eval`)."""
    source = info.source
    if info.experiment is not None and info.experiment.text is not None:
        raise ValueError(
            f"'{source}' is an image-text (LIMoE) model, not a classifier; evaluate it with "
            f"visionmoe zeroshot {source}"
        )
    data = eval_data_config(info, options)
    splits = load_splits(data)
    if classifier and splits.test.num_classes > info.num_classes:
        raise ValueError(
            f"dataset '{data.path or data.kind}' has {splits.test.num_classes} classes but the "
            f"model '{source}' predicts {info.num_classes}"
        )
    experiment = info.experiment
    return EvalInputs(
        model=model,
        info=info,
        data=data,
        splits=splits,
        batch_size=options.batch_size
        or (experiment.train.eval_batch_size if experiment else DEFAULT_EVAL_BATCH_SIZE),
        seed=experiment.train.seed if experiment else 0,
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
