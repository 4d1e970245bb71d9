"""Typed preprocessing ops and the per-sample transform built from them.

Each op is a frozen dataclass validated on construction; a :class:`Transform` is a tuple of them
applied left to right to one sample (encoded bytes, a path, or a decoded ``(H, W, C)`` array) and
returns a uint8 ``(H, W, C)`` tensor, so batches travel as uint8 and are scaled to [-1, 1] on the
device (:func:`~visionmoe.data.ops.geometry.value_range`). All randomness comes from the
``torch.Generator`` passed in, so a sample is a pure function of its generator's seed.

The V-MoE pipelines (PIPELINE.md section 1) in these terms:

- ImageNet train: ``(InceptionCrop(size=224), FlipLR(), RandAugment(num_layers=2, magnitude=10))``
- ImageNet eval at 224: ``(ResizeSmall(size=256), CentralCrop(size=224))``
- eval at other sizes: ``(Resize(size=S),)``
"""

from __future__ import annotations

from dataclasses import dataclass
from os import PathLike

import numpy as np
import torch

from visionmoe.data.ops import geometry
from visionmoe.data.ops.randaugment import RandAugment, randaugment

__all__ = [
    "CentralCrop",
    "FlipLR",
    "InceptionCrop",
    "Op",
    "RandAugment",
    "Resize",
    "ResizeSmall",
    "Transform",
    "eval_ops",
]


def _positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(kw_only=True, frozen=True)
class InceptionCrop:
    """Random crop (TF ``sample_distorted_bounding_box``), resized to ``size`` x ``size``.

    ``area_min``/``area_max`` are fractions of the image area; ``aspect_*`` bound width/height.
    On encoded input only the crop window is kept after decoding (``decode_jpeg_and_inception_
    crop``); the box is drawn from the header's size.
    """

    size: int
    area_min: float = 0.05
    area_max: float = 1.0
    aspect_min: float = 0.75
    aspect_max: float = 1.33
    attempts: int = 100

    def __post_init__(self) -> None:
        _positive("InceptionCrop.size", self.size)
        _positive("InceptionCrop.attempts", self.attempts)
        if not 0 < self.area_min <= self.area_max <= 1:
            raise ValueError(
                f"InceptionCrop area range must satisfy 0 < area_min <= area_max <= 1, "
                f"got ({self.area_min}, {self.area_max})"
            )
        if not 0 < self.aspect_min <= self.aspect_max:
            raise ValueError(
                f"InceptionCrop aspect range must satisfy 0 < aspect_min <= aspect_max, "
                f"got ({self.aspect_min}, {self.aspect_max})"
            )

    def box(self, height: int, width: int, generator: torch.Generator) -> geometry.Box:
        return geometry.sample_inception_box(
            height,
            width,
            generator,
            area_range=(self.area_min, self.area_max),
            aspect_range=(self.aspect_min, self.aspect_max),
            attempts=self.attempts,
        )

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        top, left, h, w = self.box(image.shape[0], image.shape[1], generator)
        return geometry.resize(image[top : top + h, left : left + w], self.size)


@dataclass(kw_only=True, frozen=True)
class Resize:
    """Square bilinear resize to ``size`` (no antialiasing, uint8 truncated): ``resize(S)``."""

    size: int

    def __post_init__(self) -> None:
        _positive("Resize.size", self.size)

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return geometry.resize(image, self.size)


@dataclass(kw_only=True, frozen=True)
class ResizeSmall:
    """Shorter side to ``size`` by exact area averaging (float32 out): ``resize_small(S)``."""

    size: int

    def __post_init__(self) -> None:
        _positive("ResizeSmall.size", self.size)

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return geometry.resize_small(image, self.size)


@dataclass(kw_only=True, frozen=True)
class CentralCrop:
    """The centred ``size`` x ``size`` window: ``central_crop(c)``."""

    size: int

    def __post_init__(self) -> None:
        _positive("CentralCrop.size", self.size)

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return geometry.central_crop(image, self.size)


@dataclass(kw_only=True, frozen=True)
class FlipLR:
    """Left-right mirror with probability ``p``: ``flip_lr``."""

    p: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.p <= 1:
            raise ValueError(f"FlipLR.p must be in [0, 1], got {self.p!r}")

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return geometry.flip_lr(image, generator, self.p)


def _apply_randaugment(op: RandAugment, image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return randaugment(_to_uint8(image), g, op)


Op = InceptionCrop | Resize | ResizeSmall | CentralCrop | FlipLR | RandAugment
_OP_TYPES = (InceptionCrop, Resize, ResizeSmall, CentralCrop, FlipLR, RandAugment)


def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest requantisation of a float image (after ``ResizeSmall``), max error 0.5."""
    if image.dtype == torch.uint8:
        return image
    return image.round().clamp_(0, 255).to(torch.uint8)


def _as_image(sample: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(sample, np.ndarray):
        sample = np.array(sample, copy=True)  # writable and contiguous for torch
    image = torch.as_tensor(sample)
    if image.ndim == 2:
        image = image.unsqueeze(-1)
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(
            f"expected a uint8 (H, W) or (H, W, C) image with C in {{1, 3}}, "
            f"got {image.dtype} {tuple(image.shape)}"
        )
    return image


@dataclass(kw_only=True, frozen=True)
class Transform:
    """Ops applied left to right to one sample; the result is uint8 ``(H, W, C)``, contiguous.

    A sample is encoded bytes or a file path (decoded to RGB here) or a decoded uint8 array.
    Float intermediates (``ResizeSmall``) are rounded back to uint8 at the end, so batches are
    uint8 (vmoe keeps float32 there; the difference is at most half a grey level).
    """

    ops: tuple[Op, ...]

    def __post_init__(self) -> None:
        for op in self.ops:
            if not isinstance(op, _OP_TYPES):
                names = ", ".join(t.__name__ for t in _OP_TYPES)
                raise ValueError(f"Transform ops must be one of {names}; got {op!r}")

    def __call__(
        self, sample: bytes | str | PathLike | np.ndarray | torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        ops = self.ops
        if isinstance(sample, bytes | bytearray | memoryview | str | PathLike):
            if ops and isinstance(ops[0], InceptionCrop):
                # decode_jpeg_and_inception_crop: the box comes from the header's size.
                crop = ops[0]
                image = geometry.decode_and_crop(sample, lambda h, w: crop.box(h, w, generator))
                image = geometry.resize(image, crop.size)
                ops = ops[1:]
            else:
                image = geometry.decode(sample)
        else:
            image = _as_image(sample)
        for op in ops:
            if isinstance(op, RandAugment):
                image = _apply_randaugment(op, image, generator)
            else:
                image = op(image, generator)
        return _to_uint8(image).contiguous()


def eval_ops(image_size: int, resize_small: int | None = None) -> tuple[Op, ...]:
    """Evaluation preprocessing: ``resize_small(S) + central_crop(image_size)``, else ``resize``.

    The V-MoE ImageNet evaluation at 224 uses ``resize_small=256``; fine-tuning evaluations at
    other sizes use a plain square ``resize(image_size)`` (``resize_small=None``).
    """
    if resize_small is None:
        return (Resize(size=image_size),)
    if resize_small < image_size:
        raise ValueError(f"resize_small must be >= the crop size {image_size}, got {resize_small}")
    return (ResizeSmall(size=resize_small), CentralCrop(size=image_size))
