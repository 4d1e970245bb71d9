"""The ``preprocess`` section of an experiment: which V-MoE ops a run uses, as flat typed fields.

Flat so every field can be set from the command line (``--set preprocess.randaug_layers=2``);
:meth:`PreprocessConfig.train_ops` / :meth:`eval_ops` / :meth:`mixup_config` turn it into the op
configs of :mod:`visionmoe.data.ops`. With every field at its default nothing changes: images
take the library's plain resize path (:attr:`PreprocessConfig.uses_ops` is False).
"""

from __future__ import annotations

from dataclasses import dataclass

from visionmoe.data.ops.mixup import GRANULARITIES, Mixup
from visionmoe.data.ops.pipeline import FlipLR, InceptionCrop, Op, RandAugment, Resize, eval_ops
from visionmoe.models.field_types import check_field_types

__all__ = ["PreprocessConfig"]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(kw_only=True, frozen=True)
class PreprocessConfig:
    """Training augmentation and evaluation preprocessing (PIPELINE.md sections 1 and 2).

    Training: ``inception_crop`` (random area in ``[area_min, area_max]`` of the image, aspect
    ``w/h`` in ``[aspect_min, aspect_max]``, resized to the model size; else a square resize),
    ``flip`` (left-right, p=0.5), RandAugment with ``randaug_layers`` ops at
    ``randaug_magnitude`` (0 layers: off; ``solarize_wraps`` / ``contrast_pixel_count`` opt in to
    the reference's quirks, see :mod:`visionmoe.data.ops.randaugment`), then mixup on the device
    when ``mixup_concentration > 0`` (``mixup_size`` images per mix, weights per ``device`` chunk
    (this rank's batch, or ``mixup_chunk_size`` consecutive images), per ``batch`` or per
    ``example``). Evaluation: ``resize_small(eval_resize_small)`` + ``central_crop`` to the model
    size, or a square resize when ``eval_resize_small`` is None.
    """

    inception_crop: bool = False
    area_min: float = 0.05
    area_max: float = 1.0
    aspect_min: float = 0.75
    aspect_max: float = 1.33
    flip: bool = False
    randaug_layers: int = 0
    randaug_magnitude: float = 10.0
    solarize_wraps: bool = False
    contrast_pixel_count: bool = False
    eval_resize_small: int | None = None
    mixup_concentration: float = 0.0
    mixup_size: int = 2
    mixup_granularity: str = "device"
    mixup_chunk_size: int | None = None

    def __post_init__(self) -> None:
        check_field_types(self, "preprocess.")
        _check(
            0 < self.area_min <= self.area_max <= 1,
            f"preprocess.area_min/area_max must satisfy 0 < area_min <= area_max <= 1, "
            f"got {self.area_min} / {self.area_max}",
        )
        _check(
            0 < self.aspect_min <= self.aspect_max,
            f"preprocess.aspect_min/aspect_max must satisfy 0 < aspect_min <= aspect_max, "
            f"got {self.aspect_min} / {self.aspect_max}",
        )
        _check(
            self.randaug_layers >= 0,
            f"preprocess.randaug_layers must be >= 0, got {self.randaug_layers}",
        )
        _check(
            0 <= self.randaug_magnitude <= 30,
            f"preprocess.randaug_magnitude must be in [0, 30], got {self.randaug_magnitude}",
        )
        _check(
            self.eval_resize_small is None or self.eval_resize_small > 0,
            f"preprocess.eval_resize_small must be a positive integer or None, "
            f"got {self.eval_resize_small}",
        )
        _check(
            self.mixup_concentration >= 0,
            f"preprocess.mixup_concentration must be >= 0 (0: off), got {self.mixup_concentration}",
        )
        _check(self.mixup_size >= 2, f"preprocess.mixup_size must be >= 2, got {self.mixup_size}")
        _check(
            self.mixup_granularity in GRANULARITIES,
            f"preprocess.mixup_granularity must be one of {GRANULARITIES}, "
            f"got {self.mixup_granularity!r}",
        )
        _check(
            self.mixup_chunk_size is None or self.mixup_chunk_size > 0,
            f"preprocess.mixup_chunk_size must be a positive integer or None, "
            f"got {self.mixup_chunk_size}",
        )

    @property
    def uses_ops(self) -> bool:
        """Whether samples go through the V-MoE ops (else the plain resize path)."""
        return (
            self.inception_crop
            or self.flip
            or self.randaug_layers > 0
            or self.eval_resize_small is not None
        )

    def train_ops(self, image_size: int) -> tuple[Op, ...]:
        """Crop (or resize) to ``image_size``, flip, RandAugment, in that order."""
        ops: list[Op] = []
        if self.inception_crop:
            ops.append(
                InceptionCrop(
                    size=image_size,
                    area_min=self.area_min,
                    area_max=self.area_max,
                    aspect_min=self.aspect_min,
                    aspect_max=self.aspect_max,
                )
            )
        else:
            ops.append(Resize(size=image_size))
        if self.flip:
            ops.append(FlipLR())
        if self.randaug_layers:
            ops.append(
                RandAugment(
                    num_layers=self.randaug_layers,
                    magnitude=self.randaug_magnitude,
                    solarize_wraps=self.solarize_wraps,
                    contrast_pixel_count=self.contrast_pixel_count,
                )
            )
        return tuple(ops)

    def eval_ops(self, image_size: int) -> tuple[Op, ...]:
        return eval_ops(image_size, self.eval_resize_small)

    def mixup_config(self) -> Mixup:
        return Mixup(
            concentration=self.mixup_concentration,
            size=self.mixup_size,
            granularity=self.mixup_granularity,
            chunk_size=self.mixup_chunk_size,
        )
