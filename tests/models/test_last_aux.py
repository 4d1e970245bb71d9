"""``model.last_aux`` is for inspection: it must not keep the forward's autograd graph alive."""

import gc
import weakref

import pytest
import torch

import visionmoe
from tests.models.tiny_limoe import tiny_limoe_config
from visionmoe.models.config import MoEConfig
from visionmoe.models.limoe import LIMoE, TextConfig


class _Saved:
    """Holds a tensor autograd saved for backward, so a weak reference can watch it die."""

    def __init__(self, tensor):
        self.tensor = tensor


def _graph_dies_with_outputs(run) -> bool:
    """Run ``run()`` (which returns its outputs), drop the outputs; is every saved tensor freed?"""
    refs = []

    def pack(tensor):
        box = _Saved(tensor.detach())  # detached: no cycle through a grad_fn
        refs.append(weakref.ref(box))
        return box

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.tensor):
        outputs = run()
    assert refs, "the forward saved nothing for backward"
    del outputs
    gc.collect()
    return all(ref() is None for ref in refs)


def _no_tensor_has_graph(obj, seen=None) -> bool:
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return True
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.grad_fn is None and not obj.requires_grad
    if isinstance(obj, dict):
        return all(_no_tensor_has_graph(v, seen) for v in obj.values())
    if hasattr(obj, "items") and hasattr(obj, "keys"):  # LazyMetrics: read them all
        return all(_no_tensor_has_graph(obj[k], seen) for k in list(obj.keys()))
    if hasattr(obj, "__dataclass_fields__"):
        return all(_no_tensor_has_graph(getattr(obj, f), seen) for f in obj.__dataclass_fields__)
    return True


@pytest.mark.parametrize("name", ["vmoe_debug", "ecmoe_debug", "softmoe_debug"])
def test_vit_last_aux_keeps_no_graph(name):
    torch.manual_seed(0)
    model = visionmoe.create_model(name, num_classes=3).train()
    x = torch.randn(2, 3, 32, 32)
    assert _graph_dies_with_outputs(lambda: model(x, return_aux=True))
    assert _no_tensor_has_graph(model.last_aux)
    # The aux returned with the logits still carries the gradient of the auxiliary loss.
    _, aux = model(x, return_aux=True)
    assert aux.loss.requires_grad or name != "vmoe_debug"  # EC and Soft MoE have no aux loss
    assert model.last_aux.loss.item() == pytest.approx(aux.loss.item())


def test_e3_last_aux_keeps_no_graph():
    torch.manual_seed(0)
    model = visionmoe.create_model("vmoe_debug", ensemble_members=2, top_k=1).train()
    assert _graph_dies_with_outputs(lambda: model(torch.randn(2, 3, 32, 32), return_aux=True))
    assert _no_tensor_has_graph(model.last_aux)


def test_limoe_last_aux_keeps_no_graph():
    torch.manual_seed(0)
    config = tiny_limoe_config(capacity_factor=MoEConfig().capacity_factor)
    model = LIMoE(config, TextConfig(vocab_size=64, max_len=8, embed_dim=8)).train()
    images, tokens = torch.randn(4, 1, 8, 8), torch.randint(1, 64, (4, 6))
    assert _graph_dies_with_outputs(lambda: model(images, tokens, return_aux=True))
    assert _no_tensor_has_graph(model.last_aux)
