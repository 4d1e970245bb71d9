import pytest

from visionmoe.routing import compute_capacity


def test_worked_example_from_spec():
    # S/32 at 224px: 50 tokens/image, 8 images/group -> S=400; E=8, K=2, cf=1.05.
    # raw = 400*2*1.05/8 = 105.0 -> paper round: 105; code: ceil 105 -> next multiple of 4: 108.
    assert compute_capacity(400, 8, 2, 1.05, "round", None) == 105
    assert compute_capacity(400, 8, 2, 1.05) == 108


def test_round_half_up_and_multiple_of():
    # 10*1*1.25/4 = 3.125 -> ceil 4; round 3; ceil to multiple of 4 -> 4.
    assert compute_capacity(10, 4, 1, 1.25, "ceil", None) == 4
    assert compute_capacity(10, 4, 1, 1.25, "round", None) == 3
    # 10*1*1.0/4 = 2.5 -> round half up = 3.
    assert compute_capacity(10, 4, 1, 1.0, "round", None) == 3
    assert compute_capacity(1, 8, 1, 0.01, "ceil", 4) == 4


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"num_tokens": 0}, "num_tokens"),
        ({"num_experts": -1}, "num_experts"),
        ({"top_k": 0}, "top_k"),
        ({"capacity_factor": 0.0}, "capacity_factor"),
        ({"capacity_factor": -1.0}, "-1.0"),
        ({"rounding": "floor"}, "floor"),
        ({"multiple_of": 0}, "multiple_of"),
        ({"capacity_factor": 0.01, "rounding": "round", "multiple_of": None}, "capacity 0 < 1"),
    ],
)
def test_bad_inputs_name_the_value(kwargs, fragment):
    args = {"num_tokens": 10, "num_experts": 4, "top_k": 1, "capacity_factor": 1.0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=fragment):
        compute_capacity(**args)
