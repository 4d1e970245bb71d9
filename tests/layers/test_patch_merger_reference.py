"""PatchMerger (spec section 5.1) against a float64 reference, for each of its options."""

import pytest
import torch

from visionmoe.layers.patch_merger import PatchMerger


@pytest.mark.parametrize("source", ["normed", "raw"])
@pytest.mark.parametrize("scale", [None, "rsqrt_d"])
def test_merger_matches_reference(source, scale):
    # Z = LN(X); A = softmax over the N inputs of (W Z^T * s), s = D^-0.5 or 1; Y = A Z (or A X).
    torch.manual_seed(0)
    D, N, M = 6, 5, 3
    merger = PatchMerger(D, M, merge_source=source, logit_scale=scale).double()
    with torch.no_grad():
        merger.norm.weight.uniform_(0.5, 2.0)
        merger.norm.bias.uniform_(-1.0, 1.0)
        merger.queries.mul_(4.0)  # large enough that the D^-0.5 scale changes the mixture
    x = 3 * torch.randn(2, N, D, dtype=torch.float64) + 1
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    z = (x - mean) / torch.sqrt(var + 1e-6) * merger.norm.weight + merger.norm.bias
    s = D**-0.5 if scale == "rsqrt_d" else 1.0
    attn = torch.softmax(torch.einsum("md,bnd->bmn", merger.queries, z) * s, dim=-1)
    expected = attn @ (z if source == "normed" else x)
    assert torch.allclose(merger(x), expected.detach(), atol=1e-10)
