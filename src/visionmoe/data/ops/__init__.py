"""The V-MoE preprocessing as typed ops on one image, plus batch-level mixup.

``geometry`` (decode, inception crop, resize, resize_small, central_crop, flip, value range),
``randaugment`` (the 16-op RandAugment), ``pipeline`` (typed op configs and the per-sample
:class:`Transform`), ``mixup`` (soft-target mixing of a batch). Definitions: PIPELINE.md section 2.
"""

from visionmoe.data.ops.config import PreprocessConfig
from visionmoe.data.ops.geometry import (
    central_crop,
    decode,
    flip_lr,
    inception_crop,
    resize,
    resize_small,
    sample_inception_box,
    value_range,
)
from visionmoe.data.ops.mixup import Mixup, mixup, mixup_for_step
from visionmoe.data.ops.pipeline import (
    CentralCrop,
    FlipLR,
    InceptionCrop,
    Op,
    RandAugment,
    Resize,
    ResizeSmall,
    Transform,
    eval_ops,
)
from visionmoe.data.ops.randaugment import randaugment

__all__ = [
    "CentralCrop",
    "FlipLR",
    "InceptionCrop",
    "Mixup",
    "Op",
    "PreprocessConfig",
    "RandAugment",
    "Resize",
    "ResizeSmall",
    "Transform",
    "central_crop",
    "decode",
    "eval_ops",
    "flip_lr",
    "inception_crop",
    "mixup",
    "mixup_for_step",
    "randaugment",
    "resize",
    "resize_small",
    "sample_inception_box",
    "value_range",
]
