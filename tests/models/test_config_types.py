"""Config values are type-checked in the Python API as they are on the command line."""

import math

import pytest

from visionmoe import create_model
from visionmoe.models.config import MoEConfig, ViTConfig
from visionmoe.models.registry import get_config
from visionmoe.models.routing_control import set_routing
from visionmoe.train.config import DataConfig, OptimConfig, TrainConfig


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(batch_priority="no"), "batch_priority must be True/False, got 'no'"),
        (dict(renormalize="no"), "renormalize must be True/False, got 'no'"),
        (dict(qk_norm="no"), "qk_norm must be True/False, got 'no'"),
        (dict(batch_priority=1), "batch_priority must be True/False, got 1"),
        (dict(capacity_factor=math.inf), "capacity_factor must be a finite number, got inf"),
        (dict(eval_capacity_factor=math.inf), "eval_capacity_factor.*got inf"),
        (dict(noise_std=math.nan), "noise_std must be a finite number, got nan"),
        (dict(importance_weight=math.inf), "importance_weight.*got inf"),
        (dict(num_experts=4.0), "num_experts must be an integer, got 4.0"),
        (dict(num_experts=0), "num_experts must be a positive integer, got 0"),
        (dict(top_k=True), "top_k must be an integer, got True"),
        (dict(group_images=-1), "group_images.*got -1"),
        (dict(router=3), "router must be a string, got 3"),
        (dict(num_classes="10"), "num_classes must be an integer, got '10'"),
        (dict(dropout=math.nan), "dropout must be a finite number, got nan"),
    ],
)
def test_create_model_rejects_wrong_types(overrides, message):
    with pytest.raises(ValueError, match=message):
        create_model("vmoe_debug", **overrides)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: TrainConfig(threads=-2), "train.threads.*got -2"),
        (lambda: TrainConfig(threads=0), "train.threads.*got 0"),
        (lambda: TrainConfig(steps=10.5), "train.steps must be an integer, got 10.5"),
        (lambda: OptimConfig(lr=math.nan), "optim.lr must be a finite number, got nan"),
        (lambda: OptimConfig(decay_kernels_only="yes"), "optim.decay_kernels_only.*'yes'"),
        (lambda: DataConfig(hflip="no"), "data.hflip must be True/False, got 'no'"),
        (lambda: TrainConfig(keep_checkpoints=0), "train.keep_checkpoints must be >= 1, got 0"),
        (lambda: OptimConfig(beta2=1.5), r"optim.beta2 must be in \[0, 1\), got 1.5"),
    ],
)
def test_experiment_configs_reject_wrong_types(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_numbers_of_the_right_kind_are_accepted():
    # An int where a float is declared is fine (JSON writes 1.0 as 1 in some tools).
    config = MoEConfig(capacity_factor=1, eval_capacity_factor=2)
    assert config.capacity_factor == 1
    assert ViTConfig(moe=config, moe_layers=[1], num_layers=2).moe_layers == (1,)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(batch_priority="no"), "batch_priority must be True, False or None, got 'no'"),
        (dict(capacity_factor=math.inf), "capacity_factor must be a finite number > 0, got inf"),
        (dict(capacity_factor=0), "capacity_factor.*got 0"),
        (dict(top_k=0), "top_k must be a positive integer or None, got 0"),
    ],
)
def test_set_routing_rejects(kwargs, message):
    model = create_model("vmoe_debug")
    with pytest.raises(ValueError, match=message):
        set_routing(model, **kwargs)
    # Nothing was changed by the failed call.
    router = model.moe_blocks[min(model.moe_blocks)].router
    assert router.batch_priority is False and router.eval_capacity_factor is None


def test_switching_router_applies_its_defaults():
    base = get_config("vmoe_debug").moe
    assert (base.noise_std, base.group_images, base.capacity_rounding) == (1.0, 2, "ceil")
    soft = get_config("vmoe_debug", router="soft").moe
    assert soft.noise_std == 0.0 and soft.group_images == 1  # Soft MoE: no noise, one image
    ec = get_config("vmoe_debug", router="expert_choice").moe
    # Expert Choice: one image per group, capacity rounded to nearest with no multiple of 4.
    assert (ec.group_images, ec.capacity_rounding, ec.capacity_multiple_of) == (1, "round", None)
    # What the user sets in the same call wins over the router's defaults.
    user = get_config("vmoe_debug", router="soft", noise_std=0.5, group_images=2).moe
    assert user.noise_std == 0.5 and user.group_images == 2
    # Back to token choice: V-MoE's defaults again.
    back = get_config("vmoe_debug", router="expert_choice")
    from visionmoe.models.registry import apply_overrides

    again = apply_overrides(back, router="top_k").moe
    assert (again.group_images, again.capacity_rounding, again.capacity_multiple_of) == (
        8,
        "ceil",
        4,
    )
