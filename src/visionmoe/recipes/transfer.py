"""Fine-tuning recipes of the released V-MoE transfer configs (start them with ``--init SOURCE``).

Settings are those of the released vmoe configs (PIPELINE.md sections 4 and 7): SGD with
momentum 0.9 and no weight decay, global-norm clipping at 10, linear warmup then cosine decay to
1e-5, softmax cross-entropy, capacity factor 1.5 in training and evaluation, no BPR, a new head
(zero kernel, bias ``-ln C`` or the stated value) and position embeddings resized to the new
grid. SOURCE is the released checkpoint (a vmoe prefix, or the folder ``visionmoe convert`` wrote
from it), a run directory or a checkpoint.

Not reproduced here: the published accuracies in the docstrings are the released configs' own,
measured on TPUs with their input pipelines; these recipes were only run on tiny stand-ins in
the tests. Training samples go through ``inception_crop(S) | flip_lr`` and evaluation through a
square ``resize(S)``, as in the released configs (PIPELINE.md section 1). Batch 1024 at 384 px
needs accelerators with large memory (use ``--set train.grad_accum=N`` to split a step).
"""

from __future__ import annotations

from typing import Any

from visionmoe.convert.presets import get_preset
from visionmoe.convert.vmoe_params import vmoe_model_config
from visionmoe.data.ops import PreprocessConfig
from visionmoe.models.config import ViTConfig
from visionmoe.recipes.registry import recipe
from visionmoe.train.config import (
    DataConfig,
    ExperimentConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
)

# The released fine-tuning pipelines: inception crop + flip for training, square resize for
# evaluation (eval_resize_small=None), no RandAugment, no mixup.
_FT_PREPROCESS = PreprocessConfig(inception_crop=True, flip=True)

# The released fine-tuning runs: capacity factor 1.5 in training and at evaluation.
_FT_ROUTING = {"capacity_factor": 1.5, "eval_capacity_factor": 1.5, "batch_priority": False}


def _model(preset: str, **overrides: Any) -> ViTConfig:
    """The upstream checkpoint's architecture (its preset) with the fine-tuning changes."""
    return vmoe_model_config({}, dict(get_preset(preset).overrides), {**_FT_ROUTING, **overrides})


def _transfer(
    name: str,
    model: ViTConfig,
    data: DataConfig,
    *,
    steps: int,
    lr: float,
    warmup: int,
    eval_every: int,
) -> ExperimentConfig:
    return ExperimentConfig(
        name=name,
        model=model,
        data=data,
        preprocess=_FT_PREPROCESS,
        optim=OptimConfig(name="sgd", lr=lr, momentum=0.9, weight_decay=0.0, grad_clip=10.0),
        schedule=ScheduleConfig(name="cosine", warmup_steps=warmup, end_lr=1e-5),
        train=TrainConfig(
            steps=steps,
            batch_size=1024,
            eval_batch_size=1024,
            loss="softmax",
            eval_every=eval_every,
            checkpoint_every=eval_every,
            log_every=min(50, eval_every),
        ),
    )


@recipe
def vmoe_s32_ilsvrc2012_ft384() -> ExperimentConfig:
    """V-MoE-S/32 Last-2 fine-tuned on ILSVRC2012 at 384 px: published 75.9% (not reproduced).

    Command: ``visionmoe train --recipe vmoe_s32_ilsvrc2012_ft384 --init
    ckpts/vmoe_s32_last2_ilsvrc2012_randaug_light1 --data imagenet/`` (``imagenet/train/`` and
    ``imagenet/val/``, one folder per class).

    From ``vmoe_s32_last2_ilsvrc2012_randaug_light1`` (preset ``vmoe_s32_last2_ilsvrc2012``):
    E=8, K=2, MoE blocks 5 and 7, groups of 8 images (1160 tokens), capacity factor 1.5 in
    training and evaluation; pre-logits dropped, new head (zero kernel, bias -ln 1000); position
    embeddings 7x7 -> 12x12. 10,000 steps of batch 1024, SGD momentum 0.9, no weight decay,
    clip 10, warmup 500 steps to 3e-3 then cosine to 1e-5; evaluation every 1000 steps with
    ``resize(384)``.

    Published (vmoe config docstring, not reproduced here): ImageNet val 75.9%, minival 78.8%,
    ReaL 77.1%, v2 62.0%; 48 min on TPUv3-8.
    """
    model = _model(
        "vmoe_s32_last2_ilsvrc2012", image_size=384, num_classes=1000, representation_size=None
    )
    return _transfer(
        "vmoe_s32_ilsvrc2012_ft384",
        model,
        DataConfig(kind="folder"),
        steps=10_000,
        lr=3e-3,
        warmup=500,
        eval_every=1000,
    )


@recipe
def vmoe_b16_cifar10_ft128() -> ExperimentConfig:
    """V-MoE-B/16 (ImageNet-21k) fine-tuned on CIFAR-10 at 128 px: published 98.7% (not reproduced).

    Command: ``visionmoe train --recipe vmoe_b16_cifar10_ft128 --init
    ckpts/vmoe_b16_imagenet21k_randaug_strong --data cifar-10-batches-py/``.

    From ``vmoe_b16_imagenet21k_randaug_strong`` (preset ``vmoe_b16_imagenet21k``): E=8, K=2,
    MoE blocks 1, 3, 5, 7, 9, 11, groups of 8 images (520 tokens), capacity factor 1.5 in
    training and evaluation; new head (zero kernel, bias -ln 10); position embeddings 14x14 ->
    8x8. 1,000 steps of batch 1024, SGD momentum 0.9, no weight decay, clip 10, warmup 100 steps
    to 1.5e-3 then cosine to 1e-5; evaluation every 100 steps with ``resize(128)``.

    Published (vmoe config docstring, not reproduced here): CIFAR-10 test 98.7%; about 10 min
    on TPUv3-8.
    """
    model = _model("vmoe_b16_imagenet21k", image_size=128, num_classes=10)
    return _transfer(
        "vmoe_b16_cifar10_ft128",
        model,
        DataConfig(kind="cifar10"),
        steps=1000,
        lr=1.5e-3,
        warmup=100,
        eval_every=100,
    )


@recipe
def eee_s32_cifar100_ft128() -> ExperimentConfig:
    """E^3-S/32 Last-2 fine-tuned on CIFAR-100 at 128 px: published 81.3% (not reproduced).

    Command: ``visionmoe train --recipe eee_s32_cifar100_ft128 --init
    ckpts/eee_s32_last2_ilsvrc2012 --data cifar-100-python/``.

    From ``eee_s32_last2_ilsvrc2012`` (preset ``eee_s32_last2_ilsvrc2012``): 2 ensemble members
    of 4 experts each, K=1, MoE blocks 5 and 7, groups of 128 images (128 x 2 copies x 17
    tokens = 4352 tokens), capacity factor 1.5 in training and evaluation;
    pre-logits (Dense 512 + tanh) kept, new head (zero kernel, bias -10); position embeddings
    7x7 -> 4x4. 2,000 steps of batch 1024, each member's softmax cross-entropy, SGD momentum
    0.9, no weight decay, clip 10, warmup 200 steps to 5e-3 then cosine to 1e-5; evaluation
    every 100 steps with ``resize(128)`` (ensemble prediction).

    Published (vmoe config, not reproduced here): CIFAR-100 test 81.31% (81.26% from the
    released checkpoint's notebook); about 10 min on TPUv3-8.
    """
    model = _model(
        "eee_s32_last2_ilsvrc2012",
        image_size=128,
        num_classes=100,
        representation_size=512,
        head_bias_init=-10.0,
        group_images=128,
    )
    return _transfer(
        "eee_s32_cifar100_ft128",
        model,
        DataConfig(kind="cifar100"),
        steps=2000,
        lr=5e-3,
        warmup=200,
        eval_every=100,
    )
