"""What is known about an opened model: the typed record returned next to it by ``load_model``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from torch import nn

from visionmoe.models.config import ViTConfig
from visionmoe.train.config import ExperimentConfig

# A run directory (config.json + checkpoints/latest), one checkpoint (checkpoints/step_N with
# meta.json), a save_pretrained folder (config.json + model.safetensors) or an official vmoe
# checkpoint prefix (PREFIX.index + PREFIX.data-*).
SOURCE_KINDS = ("run", "checkpoint", "pretrained", "vmoe")
PREPROCESS_PIPELINES = ("vmoe", "training")

# vmoe's evaluation pipelines (PIPELINE.md section 1): 224-px models read
# resize_small(256) | central_crop(224); models fine-tuned at S read resize(S), no crop.
VMOE_CROP_SIZE = 224
VMOE_RESIZE_SMALL = 256


@dataclass(kw_only=True, frozen=True)
class EvalPreprocess:
    """How an evaluation image becomes a ``size`` x ``size`` model input (before [-1, 1]).

    ``resize_small=None``: square bilinear ``resize(size)``. ``resize_small=R``: resize so the
    shorter side is R (aspect ratio kept), then ``central_crop(size)``. ``pipeline="vmoe"`` runs
    vmoe's ops (``visionmoe.data.ops.eval_ops``: TF-style bilinear without antialiasing, area
    averaging for ``resize_small``); ``pipeline="training"`` resizes exactly as this library's
    training loop does (antialiased bilinear), so a run is evaluated on the inputs it was trained
    on; it allows no ``resize_small``.
    """

    size: int
    resize_small: int | None = None
    pipeline: str = "vmoe"

    def __post_init__(self) -> None:
        if not (isinstance(self.size, int) and self.size > 0):
            raise ValueError(f"preprocess.size must be a positive integer, got {self.size!r}")
        if self.resize_small is not None and not (
            isinstance(self.resize_small, int) and self.resize_small >= self.size
        ):
            raise ValueError(
                f"preprocess.resize_small must be None or an integer >= preprocess.size "
                f"({self.size}), got {self.resize_small!r}"
            )
        if self.pipeline not in PREPROCESS_PIPELINES:
            raise ValueError(
                f"preprocess.pipeline must be one of {PREPROCESS_PIPELINES}, got {self.pipeline!r}"
            )
        if self.pipeline == "training" and self.resize_small is not None:
            raise ValueError(
                "preprocess.resize_small needs preprocess.pipeline=vmoe (the training pipeline "
                f"only resizes), got resize_small={self.resize_small}"
            )

    def describe(self) -> str:
        if self.pipeline == "training":
            return f"resize({self.size}) as in training"
        if self.resize_small is None:
            return f"resize({self.size})"
        return f"resize_small({self.resize_small}) | central_crop({self.size})"

    @classmethod
    def vmoe_default(cls, image_size: int) -> EvalPreprocess:
        """vmoe's rule: ``resize_small(256) | central_crop(224)`` at 224, else ``resize(S)``."""
        if image_size == VMOE_CROP_SIZE:
            return cls(size=image_size, resize_small=VMOE_RESIZE_SMALL)
        return cls(size=image_size)


@dataclass(kw_only=True, frozen=True)
class ModelInfo:
    """What ``load_model`` learnt about a model besides its weights.

    Attributes:
      source: the path as given.
      kind: one of ``SOURCE_KINDS``.
      model_config: the architecture the model was built with (overrides applied).
      experiment: the training config of a run or checkpoint; None for pretrained folders and
        vmoe checkpoints, which hold a model but no training settings.
      class_names: one name per output class (``"0" .. "C-1"`` where none were stored).
      preprocess: how evaluation images are prepared for this model (see ``EvalPreprocess``).
      checkpoint: the checkpoint directory read (runs and checkpoints), else None.
      step: the training step of that checkpoint, else None.
    """

    source: str
    kind: str
    model_config: ViTConfig
    experiment: ExperimentConfig | None = None
    class_names: tuple[str, ...]
    preprocess: EvalPreprocess
    checkpoint: Path | None = None
    step: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"kind must be one of {SOURCE_KINDS}, got {self.kind!r}")

    @property
    def image_size(self) -> int:
        return self.model_config.image_size

    @property
    def in_chans(self) -> int:
        return self.model_config.in_chans

    @property
    def num_classes(self) -> int:
        return self.model_config.num_classes


class LoadedModel(NamedTuple):
    """``model, info = load_model(source)``: the model in eval mode and its :class:`ModelInfo`."""

    model: nn.Module
    info: ModelInfo
