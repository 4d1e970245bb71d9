"""The small recipes: bundled digits, Fashion-MNIST, CIFAR-10 (see each docstring)."""

from __future__ import annotations

from dataclasses import replace

from visionmoe.models.config import MoEConfig, ViTConfig, dense_twin
from visionmoe.models.limoe import TextConfig
from visionmoe.models.variants import every_n
from visionmoe.recipes.registry import recipe
from visionmoe.train.config import (
    DataConfig,
    ExperimentConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
)

# Digits: 8x8 greyscale, patch 2 -> 16 patches (+ a class token with the token head).
_DIGITS_VIT = dict(
    image_size=8,
    patch_size=2,
    in_chans=1,
    num_classes=10,
    hidden_size=64,
    mlp_dim=128,
    num_heads=4,
    num_layers=4,
)
_DIGITS_MOE = MoEConfig(
    num_experts=8, top_k=2, capacity_factor=1.05, eval_capacity_factor=4.0, group_images=8
)


def _experiment(
    name: str,
    model: ViTConfig,
    data: DataConfig,
    steps: int,
    batch_size: int,
    warmup: int,
    eval_every: int,
    checkpoint_every: int,
    log_every: int,
    eval_batch_size: int = 256,
) -> ExperimentConfig:
    """The optimiser and loss settings every image recipe shares (AdamW 2e-3, smoothing 0.1)."""
    return ExperimentConfig(
        name=name,
        model=model,
        data=data,
        optim=OptimConfig(lr=2e-3, weight_decay=0.05, grad_clip=1.0),
        schedule=ScheduleConfig(warmup_steps=warmup),
        train=TrainConfig(
            steps=steps,
            batch_size=batch_size,
            eval_every=eval_every,
            checkpoint_every=checkpoint_every,
            log_every=log_every,
            eval_batch_size=eval_batch_size,
            label_smoothing=0.1,
        ),
    )


def _digits(name: str, model: ViTConfig, steps: int = 2000) -> ExperimentConfig:
    data = DataConfig(kind="digits", crop_padding=1)
    return _experiment(name, model, data, steps, 64, 100, 500, 250, 25)


@recipe
def digits_vmoe() -> ExperimentConfig:
    """V-MoE on the bundled digits (E=8, K=2, MoE in alternate blocks, GAP head) -- the default.

    Command: ``visionmoe train`` (same as ``visionmoe train --recipe digits_vmoe``).
    Expected: test accuracy 0.973 / 0.991 / 0.980 (seeds 0 / 1 / 2); 64-68 s on 2 CPU cores.
    """
    # GAP head: a class-token head reads one token, and BPR drops exactly that token first under
    # reduced capacity (its router confidence in block 1 is among the lowest): at cf 0.1 the
    # class token kept its expert in 11% of images with BPR, 36% with vanilla routing.
    model = ViTConfig(
        **{**_DIGITS_VIT, "classifier": "gap"}, moe=_DIGITS_MOE, moe_layers=every_n(4, 2)
    )
    return _digits("digits_vmoe", model)


@recipe
def digits_tiny() -> ExperimentConfig:
    """A seconds-long V-MoE on digits (patch 4, width 32, E=4, K=2 in block 1 of 2) for smoke tests.

    Command: ``visionmoe train --recipe digits_tiny --set train.threads=1``.
    Expected: test accuracy 0.889 (seed 0) after its 150 steps; 8-20 s on one core of a
    busy machine.
    """
    moe = replace(_DIGITS_MOE, num_experts=4)
    model = ViTConfig(
        **{
            **_DIGITS_VIT,
            "patch_size": 4,
            "hidden_size": 32,
            "mlp_dim": 64,
            "num_heads": 2,
            "num_layers": 2,
            "classifier": "gap",
        },
        moe=moe,
        moe_layers=(1,),
    )
    data = DataConfig(kind="digits", crop_padding=0)
    config = _experiment("digits_tiny", model, data, 150, 32, 10, 150, 150, 25)
    return replace(config, optim=replace(config.optim, lr=5e-3))


@recipe
def digits_vit() -> ExperimentConfig:
    """Dense ViT twin of ``digits_vmoe`` at equal active FLOPs (MLP width K x F in MoE blocks).

    Command: ``visionmoe train --recipe digits_vit``.
    Expected: test accuracy 0.984 (seed 0); 50 s on 2 idle cores.
    """
    return _digits("digits_vit", dense_twin(digits_vmoe().model))


_PER_IMAGE = dict(
    group_images=1,
    capacity_factor=1.0,
    eval_capacity_factor=1.0,
    importance_weight=0.0,
    load_weight=0.0,
)


@recipe
def digits_softmoe() -> ExperimentConfig:
    """Soft MoE on digits: 8 experts x 2 slots (16 slots for 16 patches), GAP head, last 2 blocks.

    Command: ``visionmoe train --recipe digits_softmoe``.
    Expected: test accuracy 0.971 (seed 0); about 1 minute on 2 CPU cores.
    """
    moe = MoEConfig(router="soft", num_experts=8, slots_per_expert=2, noise_std=0.0, **_PER_IMAGE)
    model = ViTConfig(**{**_DIGITS_VIT, "classifier": "gap"}, moe=moe, moe_layers=(2, 3))
    return _digits("digits_softmoe", model)


@recipe
def digits_ecmoe() -> ExperimentConfig:
    """Expert Choice MoE on digits: E=8, cf 1 (each expert picks 2 of 16 patches), last 2 blocks.

    Command: ``visionmoe train --recipe digits_ecmoe``.
    Expected: test accuracy 0.982 (seed 0); about 45 seconds on 2 CPU cores.
    """
    moe = MoEConfig(
        router="expert_choice",
        num_experts=8,
        capacity_rounding="round",
        capacity_multiple_of=None,
        **_PER_IMAGE,
    )
    model = ViTConfig(**{**_DIGITS_VIT, "classifier": "gap"}, moe=moe, moe_layers=(2, 3))
    return _digits("digits_ecmoe", model)


@recipe
def digits_e3() -> ExperimentConfig:
    """E^3 efficient ensemble on digits: E=8 split over M=2 members, K=1, MoE in blocks 1 and 3.

    Command: ``visionmoe train --recipe digits_e3``; ``visionmoe eval RUN`` reports ensemble
    accuracy, NLL and ECE.
    Expected: ensemble test accuracy 0.980 (seed 0); about 70 seconds on 2 CPU cores.
    """
    moe = replace(_DIGITS_MOE, top_k=1, ensemble_members=2)
    model = ViTConfig(**_DIGITS_VIT, moe=moe, moe_layers=every_n(4, 2))
    return _digits("digits_e3", model)


@recipe
def digits_patchmerger() -> ExperimentConfig:
    """V-MoE on digits with a PatchMerger (16 -> 4 tokens) after block 1, GAP head.

    Command: ``visionmoe train --recipe digits_patchmerger``.
    Expected: test accuracy 0.980 (seed 0); 3 minutes on one core of a busy machine.
    """
    model = ViTConfig(
        **{**_DIGITS_VIT, "classifier": "gap"},
        moe=_DIGITS_MOE,
        moe_layers=every_n(4, 2),
        patch_merger_after=1,
        patch_merger_tokens=4,
    )
    return _digits("digits_patchmerger", model)


@recipe
def digits_limoe() -> ExperimentConfig:
    """LIMoE image-text contrastive model on captioned digits (E=8, K=1, BPR, Every-2).

    One shared encoder for 8x8 digits and generated captions ("a handwritten seven", "the digit
    7", ...); MoE routing groups mix image and text tokens; per-modality entropy losses.
    Command: ``visionmoe train --recipe digits_limoe``, then ``visionmoe zeroshot RUN``.
    Expected: zero-shot test accuracy from digit prompts alone ~0.94 (measured 0.931 / 0.940 /
    0.949 for train.seed 0 / 1 / 2); about 35 seconds on 2 CPU cores (800 steps).
    """
    moe = MoEConfig(
        num_experts=8,
        top_k=1,
        capacity_factor=1.0,
        eval_capacity_factor=2.0,
        group_images=None,
        batch_priority=True,
    )
    model = ViTConfig(
        **{**_DIGITS_VIT, "num_classes": 0, "classifier": "gap"},
        moe=moe,
        moe_layers=every_n(4, 2),
    )
    config = _digits("digits_limoe", model, steps=800)
    return replace(
        config,
        train=replace(config.train, eval_every=200, checkpoint_every=200, label_smoothing=0.0),
        text=TextConfig(max_len=16, embed_dim=64, temperature_init=0.1),
    )


# Fashion-MNIST: 28x28 greyscale, patch 4 -> 49 patches + class token (50 tokens, as S/32@224).
_FASHION_VIT = dict(
    image_size=28,
    patch_size=4,
    in_chans=1,
    num_classes=10,
    hidden_size=64,
    mlp_dim=128,
    num_heads=4,
    num_layers=4,
)


def _fashion(name: str, model: ViTConfig, steps: int = 2000) -> ExperimentConfig:
    data = DataConfig(kind="npz", crop_padding=2, hflip=True)
    return _experiment(name, model, data, steps, 128, 200, 1000, 500, 50, eval_batch_size=500)


@recipe
def fashion_mnist_vmoe() -> ExperimentConfig:
    """V-MoE on Fashion-MNIST (E=8, K=2, Every-2 of 4 blocks, 8 images per routing group).

    Command: ``visionmoe train --recipe fashion_mnist_vmoe --data PATH/fashion_mnist.npz``
    (an ``.npz`` with x_train/y_train/x_test/y_test, or use ``--set data.kind=idx`` with a folder
    of the official IDX files).
    Expected: test accuracy 0.841 (seed 0); about 4 minutes on 2 CPU cores.
    """
    return _fashion(
        "fashion_mnist_vmoe", ViTConfig(**_FASHION_VIT, moe=_DIGITS_MOE, moe_layers=every_n(4, 2))
    )


@recipe
def fashion_mnist_vit() -> ExperimentConfig:
    """Dense twin of ``fashion_mnist_vmoe`` at equal active FLOPs (MLP width 2 x 128 there).

    Command: ``visionmoe train --recipe fashion_mnist_vit --data PATH/fashion_mnist.npz``.
    Expected: test accuracy 0.848 (seed 0); 4 minutes on 2 idle CPU cores.
    """
    return _fashion("fashion_mnist_vit", dense_twin(fashion_mnist_vmoe().model))


@recipe
def fashion_mnist_softmoe() -> ExperimentConfig:
    """Soft MoE on Fashion-MNIST: 8 experts x 6 slots (48 slots for 49 patches), last 2 blocks.

    Command: ``visionmoe train --recipe fashion_mnist_softmoe --data PATH/fashion_mnist.npz``.
    Expected: test accuracy 0.841 (seed 0); 4 minutes on 2 idle CPU cores.
    """
    moe = MoEConfig(router="soft", num_experts=8, slots_per_expert=6, noise_std=0.0, **_PER_IMAGE)
    model = ViTConfig(**{**_FASHION_VIT, "classifier": "gap"}, moe=moe, moe_layers=(2, 3))
    return _fashion("fashion_mnist_softmoe", model)


@recipe
def cifar10_vmoe() -> ExperimentConfig:
    """V-MoE on CIFAR-10 (32x32, patch 4, E=8, K=2, Every-2 of 6 blocks).

    Command: ``visionmoe train --recipe cifar10_vmoe --data PATH/cifar-10-batches-py``.
    Expected: not measured (the reference machine has no CIFAR-10 copy); neither accuracy nor
    runtime has been measured for this recipe.
    """
    model = ViTConfig(
        image_size=32,
        patch_size=4,
        in_chans=3,
        num_classes=10,
        hidden_size=128,
        mlp_dim=256,
        num_heads=4,
        num_layers=6,
        moe=_DIGITS_MOE,
        moe_layers=every_n(6, 2),
    )
    return ExperimentConfig(
        name="cifar10_vmoe",
        model=model,
        data=DataConfig(kind="cifar10", crop_padding=4, hflip=True),
        optim=OptimConfig(lr=1e-3, weight_decay=0.05, grad_clip=1.0),
        schedule=ScheduleConfig(warmup_steps=500),
        train=TrainConfig(
            steps=10_000,
            batch_size=128,
            eval_every=2000,
            checkpoint_every=1000,
            log_every=100,
            eval_batch_size=500,
        ),
    )
