import pytest

from visionmoe.recipes import get_recipe, list_recipes
from visionmoe.train.config import ExperimentConfig, apply_set


def test_every_recipe_builds_and_round_trips():
    for name in list_recipes():
        cfg = get_recipe(name)
        assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg


def test_overrides_are_typed():
    cfg = apply_set(
        get_recipe("digits_vmoe"),
        [
            "model.num_experts=16",
            "model.moe_layers=1,3",
            "train.steps=10",
            "optim.grad_clip=none",
            "data.hflip=true",
            "model.eval_capacity_factor=0.5",
        ],
    )
    assert cfg.model.moe.num_experts == 16
    assert cfg.model.moe_layers == (1, 3)
    assert cfg.train.steps == 10 and cfg.optim.grad_clip is None and cfg.data.hflip is True
    assert cfg.model.moe.eval_capacity_factor == 0.5


@pytest.mark.parametrize(
    "item, fragment",
    [
        ("model.num_expert=4", "model.num_experts"),
        ("train.stepz=4", "train.steps"),
        ("nosection.x=1", "nosection"),
        ("train.steps=ten", "integer"),
        ("data.hflip=maybe", "true/false"),
        ("model.top_k=9", "top_k=9"),
        ("train.steps", "section.field=value"),
        ("optim.lr=-1", "optim.lr"),
    ],
)
def test_bad_overrides_are_errors(item, fragment):
    with pytest.raises(ValueError, match=fragment):
        apply_set(get_recipe("digits_vmoe"), [item])


def test_unknown_recipe_suggests():
    with pytest.raises(ValueError, match="digits_vmoe"):
        get_recipe("digits_vmo")


def test_set_router_brings_that_routers_defaults():
    # README: `--set model.router=soft|expert_choice` applies that router's defaults unless set.
    base = get_recipe("digits_vmoe")
    soft = apply_set(base, ["model.router=soft"]).model.moe
    assert soft.noise_std == 0.0 and soft.group_images == 1
    ec = apply_set(base, ["model.router=expert_choice"]).model.moe
    assert (ec.group_images, ec.capacity_rounding, ec.capacity_multiple_of) == (1, "round", None)
    mine = apply_set(base, ["model.router=expert_choice", "model.capacity_multiple_of=4"])
    assert mine.model.moe.capacity_multiple_of == 4
