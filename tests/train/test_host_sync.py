"""The train loop reads nothing back from the device outside log steps (static dispatch path)."""

import pytest
import torch

import visionmoe
from visionmoe.recipes import get_recipe
from visionmoe.train.config import apply_set
from visionmoe.train.host_sync import HostSyncCounter
from visionmoe.train.inputs import TensorSplit
from visionmoe.train.loop import TrainState, fit
from visionmoe.train.optim import build_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_counter_sees_each_kind_of_sync():
    x = torch.arange(6.0)
    mask = x > 2
    # Each line below makes a GPU host wait for the device: a scalar read, a copy of the
    # values, and three data-dependent output shapes.
    with HostSyncCounter() as syncs:
        float(x.sum())
        x.tolist()
        x.nonzero()
        x[mask]
        torch.bincount(x.long())
    assert syncs.counts["aten._local_scalar_dense.default"] == 1
    assert syncs.counts["Tensor.tolist"] == 1
    assert syncs.counts["aten.nonzero.default"] == 1
    assert syncs.counts["aten.index.Tensor"] == 1
    assert syncs.counts["aten.bincount.default"] == 1
    assert syncs.total == 5


def test_counter_ignores_sync_free_ops():
    x = torch.randn(8, 4)
    with HostSyncCounter() as syncs:
        y = (x @ x.T).softmax(-1).topk(2, dim=-1).indices
        torch.zeros(8, 8).scatter_(1, y, 1.0)
        torch.nn.functional.one_hot(y, 8)  # bounds are checked on the host on CPU only
        x.index_select(0, y[:, 0])
    assert syncs.total == 0, dict(syncs.counts)


def test_foreach_adamw_reads_its_step_counters_and_fused_does_not():
    # The reason build_optimizer prefers the fused kernel: for-each AdamW keeps `step` on the
    # host and turns it into Python numbers every update.
    counts = {}
    for fused in (False, True):
        p = torch.nn.Parameter(torch.randn(3))
        opt = torch.optim.AdamW([p], fused=fused, foreach=None if fused else True)
        p.grad = torch.ones(3)
        opt.step()
        with HostSyncCounter() as syncs:
            opt.step()
        counts[fused] = syncs.total
    assert counts[False] > 0
    assert counts[True] == 0


class SyncsPerStep:
    """A hook recording how many host syncs each step made (the counter is cleared after each)."""

    def __init__(self, counter: HostSyncCounter):
        self.counter = counter
        self.per_step: list[tuple[int, bool, dict]] = []

    def after_step(self, state):
        self.per_step.append((state.step, state.log_step, dict(self.counter.counts)))
        self.counter.counts.clear()

    def at_end(self, state):
        pass


@pytest.mark.parametrize("name", ["vmoe_debug", "ecmoe_debug", "softmoe_debug"])
@pytest.mark.parametrize("precision, accum", [("fp32", 1), ("bf16", 2)])
def test_no_host_sync_outside_log_steps(name, precision, accum):
    torch.manual_seed(0)
    model = visionmoe.create_model(name, dispatch="static")
    config = apply_set(
        get_recipe("digits_vmoe"),
        [
            "train.steps=7",
            "train.log_every=3",
            "train.batch_size=8",
            f"train.grad_accum={accum}",
            f"train.precision={precision}",
        ],
    )
    state = TrainState(config, model, build_optimizer(model, config.optim))
    with HostSyncCounter() as counter:
        recorder = SyncsPerStep(counter)
        fit(state, TensorSplit(torch.zeros(8), torch.zeros(8), None), [recorder], batch_fn=_fixed)
    logged = [step for step, log_step, _ in recorder.per_step if log_step]
    assert logged == [3, 6, 7]
    for step, log_step, counts in recorder.per_step:
        if log_step:
            assert counts, f"step {step}: a log step must read the metrics back"
        else:
            assert not counts, f"step {step} synced with the host: {counts}"
    assert {"train/loss", "train/grad_norm", "train/images_per_s"} <= set(state.metrics)
    assert any(k.startswith("moe/layer") for k in state.metrics)


def _fixed(data, batches, step, config):
    generator = torch.Generator().manual_seed(step)
    return torch.randn(8, 3, 32, 32, generator=generator), torch.randint(
        0, 10, (8,), generator=generator
    )
