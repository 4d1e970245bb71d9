"""torch.compile and bf16 autocast support (no timings here; see benchmarks/)."""

import pytest
import torch

import visionmoe

DEBUG_MODELS = visionmoe.list_models("*_debug")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", DEBUG_MODELS)
def test_full_graph_capture_train_step_matches_eager(name):
    # fullgraph=True fails on any graph break: the MoE path under compile must be free of
    # host syncs (.item(), nonzero, data-dependent shapes).
    torch.manual_seed(0)
    model = visionmoe.create_model(name).train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(1)
    logits, aux = compiled(x, return_aux=True)
    torch.manual_seed(1)
    ref_logits, ref_aux = model(x, return_aux=True)
    assert torch.allclose(logits, ref_logits, atol=1e-5)
    assert torch.allclose(aux.loss, ref_aux.loss, atol=1e-6)
    (logits.sum() + aux.loss).backward()


def test_inductor_compiled_vmoe_matches_eager():
    torch.manual_seed(0)
    model = visionmoe.create_model("vmoe_debug").eval()
    x = torch.randn(4, 3, 32, 32)
    compiled = torch.compile(model)
    assert torch.allclose(compiled(x), model(x), atol=1e-4)


@pytest.mark.parametrize("name", DEBUG_MODELS)
def test_bf16_autocast_keeps_routing_in_float32(name):
    torch.manual_seed(0)
    model = visionmoe.create_model(name).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, aux = model(torch.randn(4, 3, 32, 32), return_aux=True)
    assert logits.dtype == torch.bfloat16
    assert aux.loss.dtype == torch.float32
    for layer in aux.layers.values():
        if layer.gates is not None:
            assert layer.gates.dtype == torch.float32
            assert layer.plan.weight.dtype == torch.float32
    (logits.float().sum() + aux.loss).backward()
    assert all(p.grad is not None for p in model.parameters())
