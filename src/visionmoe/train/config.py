"""Typed experiment configs and ``section.field=value`` overrides.

An :class:`ExperimentConfig` holds one frozen dataclass per component (model, data, optimizer,
schedule, train). Recipes in ``configs/`` build one; the command line changes it with
``--set section.field=value``, parsed against each field's declared type (unknown keys and values
of the wrong type are errors). The resolved config is saved next to every checkpoint.
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any

from visionmoe.data import DATASET_KINDS
from visionmoe.data.ops.config import PreprocessConfig
from visionmoe.models.config import MoEConfig, ViTConfig
from visionmoe.models.field_types import check_field_types
from visionmoe.models.limoe import TextConfig
from visionmoe.models.registry import MOE_FIELDS, VIT_FIELDS, apply_overrides
from visionmoe.runtime import PRECISIONS

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "linear", "constant", "rsqrt")
LOSSES = ("softmax", "sigmoid")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(kw_only=True, frozen=True)
class DataConfig:
    """Which dataset and how images become model input.

    ``kind`` is one of ``visionmoe.data.DATASET_KINDS``; every kind but ``digits`` needs ``path``.
    Images are resized to the model's ``image_size`` and scaled to [-1, 1].

    Loading: ``num_workers`` DataLoader processes decode samples (``None``: none for in-memory
    kinds, up to 2 for file kinds), each reading ``prefetch`` batches ahead.  An image that fails
    to decode is skipped and counted (``data/skipped_images`` in the log) unless ``strict``,
    which stops with the file named.  A worker silent for ``worker_timeout_s`` seconds is an
    error rather than a hang (0 waits forever).
    """

    kind: str = "digits"
    path: str | None = None
    crop_padding: int = 0
    hflip: bool = False
    test_fraction: float = 0.25
    max_train_examples: int | None = None
    num_workers: int | None = None
    prefetch: int = 2
    strict: bool = False
    worker_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        check_field_types(self, "data.")
        _check(
            self.kind in DATASET_KINDS,
            f"data.kind must be one of {DATASET_KINDS}, got {self.kind!r}",
        )
        _check(self.crop_padding >= 0, f"data.crop_padding must be >= 0, got {self.crop_padding}")
        _check(
            0 < self.test_fraction < 1,
            f"data.test_fraction must be in (0, 1), got {self.test_fraction}",
        )
        _check(
            self.max_train_examples is None or self.max_train_examples > 0,
            f"data.max_train_examples must be > 0 or None, got {self.max_train_examples}",
        )
        _check(
            self.num_workers is None or self.num_workers >= 0,
            f"data.num_workers must be >= 0 or None (automatic), got {self.num_workers}",
        )
        _check(self.prefetch >= 1, f"data.prefetch must be >= 1, got {self.prefetch}")
        _check(
            self.worker_timeout_s >= 0,
            f"data.worker_timeout_s must be >= 0 (0 waits forever), got {self.worker_timeout_s}",
        )


@dataclass(kw_only=True, frozen=True)
class OptimConfig:
    """AdamW (decoupled weight decay, as vmoe's Adam + decay) or SGD with momentum."""

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.999
    momentum: float = 0.9
    grad_clip: float | None = 1.0
    decay_kernels_only: bool = True

    def __post_init__(self) -> None:
        check_field_types(self, "optim.")
        _check(
            self.name in OPTIMIZERS, f"optim.name must be one of {OPTIMIZERS}, got {self.name!r}"
        )
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        for name in ("beta1", "beta2", "momentum"):
            value = getattr(self, name)
            _check(0 <= value < 1, f"optim.{name} must be in [0, 1), got {value}")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _check(
            self.grad_clip is None or self.grad_clip > 0,
            f"optim.grad_clip must be > 0 or None, got {self.grad_clip}",
        )


@dataclass(kw_only=True, frozen=True)
class ScheduleConfig:
    """Linear warmup, then ``cosine`` / ``linear`` decay to ``end_lr`` (or constant / rsqrt)."""

    name: str = "cosine"
    warmup_steps: int = 100
    end_lr: float = 1e-5

    def __post_init__(self) -> None:
        check_field_types(self, "schedule.")
        _check(
            self.name in SCHEDULES, f"schedule.name must be one of {SCHEDULES}, got {self.name!r}"
        )
        _check(
            self.warmup_steps >= 0, f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}"
        )
        _check(self.end_lr >= 0, f"schedule.end_lr must be >= 0, got {self.end_lr}")


@dataclass(kw_only=True, frozen=True)
class TrainConfig:
    """Loop length, batch sizes, seeds and how often to evaluate / checkpoint / log.

    Device and loop features: ``device`` (``auto``: CUDA when available, else CPU; or ``cpu``,
    ``cuda``, ``cuda:N``); ``precision`` ``fp32`` or ``bf16`` (autocast; routers stay float32);
    ``grad_accum`` micro-batches per step (``batch_size`` is the whole step's batch and must be a
    multiple); ``remat`` recomputes each block's activations in the backward pass;
    ``compile`` runs the model through ``torch.compile``; ``tensorboard`` also writes event files
    to ``<run>/tensorboard`` (needs the ``tensorboard`` package).
    """

    steps: int = 1000
    batch_size: int = 64
    eval_batch_size: int = 256
    seed: int = 0
    loss: str = "softmax"
    label_smoothing: float = 0.0
    eval_every: int = 250
    checkpoint_every: int = 250
    log_every: int = 25
    threads: int | None = None
    keep_checkpoints: int = 2
    device: str = "auto"
    precision: str = "fp32"
    grad_accum: int = 1
    remat: bool = False
    compile: bool = False
    tensorboard: bool = False

    def __post_init__(self) -> None:
        check_field_types(self, "train.")
        for name in (
            "steps",
            "batch_size",
            "grad_accum",
            "eval_batch_size",
            "eval_every",
            "checkpoint_every",
            "log_every",
        ):
            value = getattr(self, name)
            _check(
                isinstance(value, int) and value > 0,
                f"train.{name} must be a positive integer, got {value!r}",
            )
        _check(self.seed >= 0, f"train.seed must be >= 0, got {self.seed}")
        _check(
            self.keep_checkpoints >= 1,
            f"train.keep_checkpoints must be >= 1, got {self.keep_checkpoints}",
        )
        _check(
            self.threads is None or self.threads > 0,
            f"train.threads must be a positive integer or None (all cores), got {self.threads}",
        )
        _check(self.loss in LOSSES, f"train.loss must be one of {LOSSES}, got {self.loss!r}")
        _check(
            0 <= self.label_smoothing < 1,
            f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}",
        )
        _check(
            self.precision in PRECISIONS,
            f"train.precision must be one of {PRECISIONS}, got {self.precision!r}",
        )
        _check(
            self.device in ("auto", "cpu", "cuda")
            or (self.device.startswith("cuda:") and self.device[5:].isdigit()),
            f"train.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}",
        )
        _check(
            self.batch_size % self.grad_accum == 0,
            f"train.batch_size ({self.batch_size}) must be a multiple of train.grad_accum, "
            f"got grad_accum={self.grad_accum}",
        )


@dataclass(kw_only=True, frozen=True)
class ParallelConfig:
    """How ``python -m visionmoe.distributed.train`` spreads a run (ignored by ``visionmoe train``).

    ``dense``: ``"ddp"`` replicates the non-expert part and averages its gradients with
    DistributedDataParallel; ``"fsdp"`` shards it over all ranks with FSDP2 (for dense parts that
    do not fit one device; checkpoints are then written with torch.distributed.checkpoint).
    ``merged_checkpoint``: also write the single-file checkpoint at the end of a run (readable by
    ``visionmoe eval``); ``None`` writes it when model + optimizer state is at most
    ``merged_checkpoint_max_gb`` GiB.
    """

    dense: str = "ddp"
    merged_checkpoint: bool | None = None
    merged_checkpoint_max_gb: float = 4.0

    def __post_init__(self) -> None:
        _check(
            self.dense in ("ddp", "fsdp"),
            f"parallel.dense must be 'ddp' or 'fsdp', got {self.dense!r}",
        )
        _check(
            self.merged_checkpoint_max_gb >= 0,
            f"parallel.merged_checkpoint_max_gb must be >= 0, got {self.merged_checkpoint_max_gb}",
        )


@dataclass(kw_only=True, frozen=True)
class ExperimentConfig:
    """Everything a run needs; saved as ``config.json`` in the run directory.

    ``text=None`` is image classification; a :class:`TextConfig` makes the run a LIMoE
    image-text contrastive one (``model`` is then the shared encoder's backbone).
    ``preprocess`` selects the V-MoE preprocessing ops (inception crop, flip, RandAugment,
    mixup, resize_small + central crop at evaluation); its defaults keep the plain resize.
    """

    name: str
    model: ViTConfig
    data: DataConfig
    optim: OptimConfig
    schedule: ScheduleConfig
    train: TrainConfig
    text: TextConfig | None = None
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "model": self.model.to_dict(),
            **{s: _plain(getattr(self, s)) for s in ("data", "optim", "schedule", "train")},
            "text": None if self.text is None else self.text.to_dict(),
            "parallel": _plain(self.parallel),
            "preprocess": _plain(self.preprocess),
        }

    @classmethod
    def from_dict(cls, data: dict) -> ExperimentConfig:
        return cls(
            name=data["name"],
            model=ViTConfig.from_dict(data["model"]),
            data=DataConfig(**data["data"]),
            optim=OptimConfig(**data["optim"]),
            schedule=ScheduleConfig(**data["schedule"]),
            train=TrainConfig(**data["train"]),
            text=None if data.get("text") is None else TextConfig(**data["text"]),
            parallel=ParallelConfig(**data.get("parallel", {})),
            preprocess=PreprocessConfig(**data.get("preprocess", {})),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _plain(obj: Any) -> dict:
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


_SECTIONS = {
    "data": DataConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "train": TrainConfig,
    "text": TextConfig,
    "parallel": ParallelConfig,
    "preprocess": PreprocessConfig,
}


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def parse_value(text: str, annotation: Any, key: str) -> Any:
    """Parse ``text`` as a value of type ``annotation`` (int, float, bool, str, optional, tuple)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return parse_value(text, arg, key)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if errors else f"bad value {text!r} for {key}")
    if origin is tuple:
        parts = [p for p in text.strip("()[] ").replace(",", " ").split() if p]
        return tuple(parse_value(p, args[0], key) for p in parts)
    if annotation is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{key} expects true/false, got {text!r}")
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{key} expects an integer, got {text!r}") from None
    if annotation is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{key} expects a number, got {text!r}") from None
    if annotation is str:
        return text
    raise ValueError(f"cannot parse {key} of type {annotation}")


def parse_model_options(items: list[str]) -> dict[str, Any]:
    """Typed flat model options from ``key=value`` strings (ViT or MoE field names)."""
    vit_types, moe_types = _field_types(ViTConfig), _field_types(MoEConfig)
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        name = key.strip().removeprefix("model.").removeprefix("moe.")
        if not sep:
            raise ValueError(f"model option {item!r} must look like key=value")
        if name in VIT_FIELDS:
            out[name] = parse_value(text, vit_types[name], f"model.{name}")
        elif name in MOE_FIELDS:
            out[name] = parse_value(text, moe_types[name], f"model.{name}")
        else:
            close = difflib.get_close_matches(name, sorted(VIT_FIELDS | MOE_FIELDS), n=3)
            hint = f"; did you mean {', '.join('model.' + c for c in close)}?" if close else ""
            raise ValueError(f"unknown config key 'model.{name}'{hint}")
    return out


def apply_set(config: ExperimentConfig, assignments: list[str]) -> ExperimentConfig:
    """Apply ``section.field=value`` overrides; ``model.*`` accepts ViT and MoE field names."""
    by_section: dict[str, dict[str, Any]] = {}
    model_updates: dict[str, Any] = {}
    for item in assignments:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ValueError(
                f"override {item!r} must look like section.field=value, e.g. model.num_experts=16"
            )
        key, text = item.split("=", 1)
        section, name = key.strip().split(".", 1)
        if section == "name":
            raise ValueError("the run name is set with --name")
        if section == "model":
            model_updates.update(parse_model_options([f"{name}={text}"]))
            continue
        if section not in _SECTIONS:
            raise ValueError(
                f"unknown config section {section!r} in {item!r}; sections are "
                f"{['model', *_SECTIONS]}"
            )
        if section == "text" and config.text is None:
            raise ValueError(
                f"{item!r}: text.* options need an image-text (LIMoE) recipe such as digits_limoe"
            )
        types_ = _field_types(_SECTIONS[section])
        if name not in types_:
            close = difflib.get_close_matches(name, list(types_), n=3)
            hint = f"; did you mean {', '.join(f'{section}.{c}' for c in close)}?" if close else ""
            raise ValueError(f"unknown config key {key!r}{hint}")
        by_section.setdefault(section, {})[name] = parse_value(text, types_[name], key)
    updates: dict[str, Any] = {
        s: replace(getattr(config, s), **values) for s, values in by_section.items()
    }
    if model_updates:
        updates["model"] = apply_overrides(config.model, **model_updates)
    return replace(config, **updates)
