import pytest
import torch

import visionmoe
from visionmoe.layers.patch_merger import PatchMerger


def test_shape_and_convex_mixture():
    merger = PatchMerger(16, 4).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    y = merger(x)
    assert y.shape == (2, 4, 16)
    # Identical input tokens: every output is that (normalised) token.
    same = x[:, :1].expand(-1, 9, -1)
    assert torch.allclose(merger(same), merger.norm(same)[:, :4], atol=1e-12)


def test_invariant_to_input_token_order():
    merger = PatchMerger(16, 4, merge_source="raw", logit_scale="rsqrt_d").double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    assert torch.allclose(merger(x), merger(x[:, torch.randperm(9)]), atol=1e-12)


def test_model_with_merger_reduces_tokens_for_later_moe():
    model = visionmoe.create_model(
        "vmoe_debug", classifier="gap", patch_merger_after=1, patch_merger_tokens=4
    )
    logits, aux = model(torch.randn(3, 3, 32, 32), return_aux=True)
    assert logits.shape == (3, 10)
    assert aux.layers[1].plan.num_tokens == 3 * 16  # before the merger
    assert aux.layers[3].plan.num_tokens == 3 * 4  # after it
    logits.sum().backward()
    assert model.patch_merger.queries.grad is not None


def test_merger_keeps_class_token():
    model = visionmoe.create_model("vit_debug", patch_merger_after=0, patch_merger_tokens=2)
    feats = model.forward_features(torch.randn(2, 3, 32, 32))
    assert feats.shape == (2, 3, 32)


@pytest.mark.parametrize(
    "kw, fragment",
    [
        ({"patch_merger_after": 3}, "patch_merger_after=3"),
        ({"patch_merger_after": 1, "patch_merger_source": "x"}, "'x'"),
        ({"patch_merger_after": 1, "patch_merger_tokens": 0}, "patch_merger_tokens"),
    ],
)
def test_bad_merger_config(kw, fragment):
    with pytest.raises(ValueError, match=fragment):
        visionmoe.create_model("vit_debug", **kw)
