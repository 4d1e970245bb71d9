"""Gradient accumulation, activation checkpointing, the metrics window, CUDA RNG in checkpoints."""

import json

import pytest
import torch

import visionmoe
from visionmoe.recipes import get_recipe
from visionmoe.runtime import resolve_device
from visionmoe.train import checkpoint as ckpt_module
from visionmoe.train.config import apply_set
from visionmoe.train.features import set_remat
from visionmoe.train.inputs import TensorSplit
from visionmoe.train.loop import TrainState, fit
from visionmoe.train.optim import build_optimizer
from visionmoe.train.step import classification_loss, train_step_device

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(*overrides):
    return apply_set(get_recipe("digits_vmoe"), ["optim.grad_clip=None", *overrides])


def _model(group_images=2, noise=0.0):
    torch.manual_seed(0)
    # vmoe_debug: 4x4 patches + class token = 17 tokens per image, groups of `group_images`.
    return visionmoe.create_model(
        "vmoe_debug", dispatch="static", group_images=group_images, noise_std=noise
    ).double()


def _reference_grads(model, x, y, smoothing):
    """Plain autograd on the whole batch: mean task loss + aux loss, no accumulation code."""
    model.zero_grad()
    logits, aux = model(x, return_aux=True)
    loss = torch.nn.functional.cross_entropy(logits, y, label_smoothing=smoothing) + aux.loss
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, loss.detach()


def _accumulated_grads(model, x, y, accum):
    config = _config(f"train.grad_accum={accum}", f"train.batch_size={len(x)}")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the step keeps the weights
    metrics = train_step_device(model, optimizer, x, y, config)
    return {n: p.grad.clone() for n, p in model.named_parameters()}, metrics["train/loss"]


def test_grad_accum_two_micro_batches_equal_one_step_on_the_whole_batch():
    # Routing groups of 2 images tile each micro-batch of 4 images, noise is off: the forward of
    # every image is the same in both set-ups, so the float64 gradients agree to rounding.
    model = _model(group_images=2)
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (8,))
    smoothing = _config().train.label_smoothing
    ref, ref_loss = _reference_grads(model, x, y, smoothing)
    got, loss = _accumulated_grads(model, x, y, accum=2)
    assert set(ref) == set(got)
    for name in ref:
        assert torch.allclose(got[name], ref[name], rtol=1e-9, atol=1e-12), name
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-12)


def test_grad_accum_synchronises_gradients_on_the_last_micro_batch_only():
    # A data-parallel wrapper is told to skip gradient sync for all but the last backward:
    # DDP-style through no_sync(), FSDP2-style through set_requires_gradient_sync().
    import contextlib

    events = []

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner

        def forward(self, *args, **kwargs):
            events.append("forward")
            return self.module(*args, **kwargs)

    class DdpLike(Wrapper):
        @contextlib.contextmanager
        def no_sync(self):
            events.append("no_sync")
            yield

    class FsdpLike(Wrapper):
        def set_requires_gradient_sync(self, flag):
            events.append(f"sync={flag}")

    x = torch.randn(12, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (12,))
    _accumulated_grads(DdpLike(_model()), x, y, accum=3)
    assert events == ["no_sync", "forward", "no_sync", "forward", "forward"]
    events.clear()
    _accumulated_grads(FsdpLike(_model()), x, y, accum=3)
    assert events == ["sync=False", "forward", "sync=False", "forward", "sync=True", "forward"]


def test_grad_accum_differs_when_routing_groups_cross_micro_batches():
    # One routing group of 8 images over the whole batch: with 2 micro-batches of 4 images the
    # tokens compete for capacity in two smaller groups instead, so routing (and the gradient)
    # changes. This is the documented limit of accumulation for routed models.
    model = _model(group_images=8)
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (8,))
    ref, _ = _reference_grads(model, x, y, _config().train.label_smoothing)
    got, _ = _accumulated_grads(model, x, y, accum=2)
    diff = max((got[n] - ref[n]).abs().max().item() for n in ref)
    assert diff > 1e-6


def test_remat_gives_the_same_gradients_with_router_noise_on():
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (4,))
    grads = []
    for remat in (False, True):
        model = _model(noise=1.0)
        assert set_remat(model, remat) == 4
        torch.manual_seed(1)
        grads.append(_reference_grads(model, x, y, 0.0)[0])
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-10, atol=1e-13), name


def test_metrics_window_logs_the_mean_of_the_steps_since_the_last_log(tmp_path):
    # A stub step returns the step number as its loss: steps 0..4 are logged at step 5 as
    # (0+1+2+3+4)/5 = 2, steps 5..6 at step 7 (the last) as (5+6)/2 = 5.5.
    config = _config("train.steps=7", "train.log_every=5", "train.batch_size=4")
    model = torch.nn.Linear(2, 2)
    seen = []

    def step_fn(model, optimizer, x, y, config):
        step = seen[-1]
        return {"train/loss": torch.tensor(float(step)), "train/accuracy": 0.5 + step}

    def batch_fn(data, batches, step, config):
        seen.append(step)
        return torch.zeros(3, 2), torch.zeros(3)

    class Record:
        logged = []

        def after_step(self, state):
            if state.log_step:
                self.logged.append((state.step, dict(state.metrics)))

        def at_end(self, state):
            pass

    state = TrainState(config, model, torch.optim.SGD(model.parameters(), lr=0.1))
    fit(state, TensorSplit(torch.zeros(4), torch.zeros(4), None), [Record()], batch_fn, step_fn)
    (s1, m1), (s2, m2) = Record.logged
    assert (s1, s2) == (5, 7)
    assert m1["train/loss"] == 2.0 and m2["train/loss"] == 5.5
    assert m1["train/accuracy"] == 2.5 and m2["train/accuracy"] == 6.0
    for m in (m1, m2):
        assert m["train/images_per_s"] > 0
        assert m["train/data_wait_s"] >= 0
        assert m["train/peak_memory_mb"] > 0


def test_cuda_rng_states_are_saved_and_restored(tmp_path, monkeypatch):
    # No GPU here: stand in two CUDA generators so the save / restore code path runs.
    states = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in states])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda new: restored.extend(new))
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, get_recipe("digits_vmoe").optim)
    ckpt_module.save_checkpoint(tmp_path, 3, model, optimizer, {"name": "x"})
    loaded = ckpt_module.load_checkpoint(tmp_path, with_optimizer=True)
    assert [torch.equal(a, b) for a, b in zip(loaded["rng_cuda"], states, strict=True)] == [
        True,
        True,
    ]
    ckpt_module.restore_rng_state(loaded["rng"], loaded["rng_cuda"])
    assert len(restored) == 2 and torch.equal(restored[1], states[1])


def test_checkpoint_without_cuda_has_no_cuda_rng(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, get_recipe("digits_vmoe").optim)
    ckpt_module.save_checkpoint(tmp_path, 1, model, optimizer, {"name": "x"})
    assert ckpt_module.load_checkpoint(tmp_path, with_optimizer=True)["rng_cuda"] == []


def test_bad_device_and_precision_are_one_line_errors():
    with pytest.raises(ValueError, match="train.precision must be one of"):
        _config("train.precision=fp16")
    with pytest.raises(ValueError, match="train.device must be"):
        _config("train.device=tpu")
    with pytest.raises(ValueError, match="multiple of train.grad_accum"):
        _config("train.batch_size=10", "train.grad_accum=3")
    with pytest.raises(ValueError, match="must be 'auto', 'cpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_bf16_loss_is_float32_and_close_to_fp32():
    model = visionmoe.create_model("vmoe_debug", dispatch="static", noise_std=0.0)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    losses = {}
    for precision in ("fp32", "bf16"):
        config = _config(f"train.precision={precision}", "train.batch_size=4")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        metrics = train_step_device(model, optimizer, x, y, config)
        assert metrics["train/loss"].dtype == torch.float32
        losses[precision] = float(metrics["train/task_loss"])
    assert losses["bf16"] == pytest.approx(losses["fp32"], abs=0.05)
    logits = model(x).float()
    assert float(classification_loss(logits.detach(), y, "softmax", 0.1)) == pytest.approx(
        losses["fp32"], abs=1e-5
    )


def test_compile_tensorboard_and_speed_fields_in_a_run(tmp_path, tiny_model, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from visionmoe.train import features
    from visionmoe.train.run import run_training

    monkeypatch.setattr(features, "COMPILE_BACKEND", "eager")
    config = apply_set(
        get_recipe("digits_vmoe"),
        [
            *tiny_model,
            "data.max_train_examples=64",
            "train.steps=4",
            "train.batch_size=16",
            "train.log_every=2",
            "train.eval_every=4",
            "train.checkpoint_every=4",
            "train.compile=true",
            "train.remat=true",
            "train.tensorboard=true",
            "train.grad_accum=2",
            "train.device=cpu",
        ],
    )
    summary = run_training(config, run_dir=tmp_path / "run", progress=False)
    assert summary["steps"] == 4
    lines = [
        json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().split("\n")[:-1]
    ]
    train_lines = [x for x in lines if "train/loss" in x]
    assert [x["step"] for x in train_lines] == [2, 4]
    for key in ("train/images_per_s", "train/data_wait_s", "train/peak_memory_mb"):
        assert all(x[key] >= 0 for x in train_lines), key
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [2, 4]
    assert loss[-1].value == pytest.approx(train_lines[-1]["train/loss"], rel=1e-6)
    assert "eval/digits/accuracy" in events.Tags()["scalars"]


def test_auto_dispatch_is_static_off_the_cpu():
    # On an accelerator the index path must not size buffers from the data (no host sync).
    from visionmoe.layers.dispatch import resolve_dispatch

    assert resolve_dispatch("auto", torch.empty(2, device="meta")) == "static"
    assert resolve_dispatch("auto", torch.empty(2)) == "compact"  # CPU without a plan
    assert resolve_dispatch("compact", torch.empty(2, dtype=torch.bfloat16)) == "compact"


@pytest.mark.parametrize(
    "kept, fp32, bf16, infer",
    [
        (60, "static", "static", "static"),
        (56, "static", "static", "compact"),
        (52, "compact", "static", "compact"),
        (40, "compact", "compact", "compact"),
    ],
)
def test_auto_dispatch_on_cpu_follows_the_slot_fill(kept, fp32, bf16, infer):
    # 64 assignments into 4 experts x 16 slots: kept / 64 of the slots filled (0.94, 0.875,
    # 0.81, 0.625). Static from 85% filled in fp32 training, 75% in bf16 training, 90% in
    # inference.
    from dataclasses import replace

    from visionmoe.layers.dispatch import (
        STATIC_MIN_FILL,
        STATIC_MIN_FILL_BF16,
        STATIC_MIN_FILL_INFERENCE,
        resolve_dispatch,
    )
    from visionmoe.routing.top_k import TokenChoiceRouter

    assert 40 / 64 < STATIC_MIN_FILL_BF16 <= 52 / 64 < STATIC_MIN_FILL <= 56 / 64
    assert 56 / 64 < STATIC_MIN_FILL_INFERENCE <= 60 / 64
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    plan, _ = TokenChoiceRouter(8, 4, 1, 1.0, noise_std=0.0)(x, None)
    keep = torch.arange(64) < kept
    plan = replace(plan, keep=keep, capacity=16)
    assert resolve_dispatch("auto", x, plan) == fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert resolve_dispatch("auto", x, plan) == bf16
    with torch.no_grad():
        assert resolve_dispatch("auto", x, plan) == infer
        assert resolve_dispatch("static", x, plan) == "static"


def test_auto_dispatch_in_fp32_training_follows_router_plans():
    # Real plans: top-1 at cf 1.0 fills (almost) every slot, top-2 at cf 1.25 at most 80%.
    from visionmoe.layers.dispatch import STATIC_MIN_FILL, resolve_dispatch
    from visionmoe.routing.top_k import TokenChoiceRouter

    torch.manual_seed(0)
    x = torch.randn(64, 8)
    for top_k, cf in ((1, 1.0), (2, 1.25)):
        plan, _ = TokenChoiceRouter(8, 4, top_k, cf, noise_std=0.0)(x, None)
        fill = float(plan.keep.sum()) / (plan.num_experts * plan.capacity)
        expected = "static" if fill >= STATIC_MIN_FILL else "compact"
        assert resolve_dispatch("auto", x, plan) == expected
    assert resolve_dispatch("auto", x, plan) == "compact"  # top-2, cf 1.25


def test_bf16_training_forward_uses_the_updated_weights():
    # A bf16 forward of the trained model equals the same forward of a fresh copy built from its
    # state dict: nothing cached from before the optimizer steps (e.g. low-precision casts of
    # the expert weights) may survive them.
    config = _config("train.precision=bf16", "train.batch_size=8", "optim.lr=0.05")
    torch.manual_seed(0)
    model = visionmoe.create_model("vmoe_debug", dispatch="static", noise_std=0.0)
    optimizer = build_optimizer(model, config.optim)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(3):
        train_step_device(model, optimizer, x, y, config)
    fresh = visionmoe.create_model("vmoe_debug", dispatch="static", noise_std=0.0)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        trained_out, fresh_out = model.eval()(x), fresh.eval()(x)
    assert torch.equal(trained_out, fresh_out)


def test_grad_accum_casts_expert_weights_once_per_step_in_bf16():
    # bf16 with 2 micro-batches: the fp32 -> bf16 casts of the expert weights happen once per
    # step (reused by the second micro-batch), gradients are exactly those of casting twice, and
    # nothing stays cached after the step.
    from torch.utils._python_dispatch import TorchDispatchMode

    from visionmoe.layers import Experts

    class WeightCasts(TorchDispatchMode):
        def __init__(self, shapes):
            super().__init__()
            self.shapes, self.count = shapes, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            src = args[0] if args else None
            if (
                func is torch.ops.aten._to_copy.default
                and isinstance(src, torch.Tensor)
                and src.dtype == torch.float32
                and kwargs.get("dtype") == torch.bfloat16
                and tuple(src.shape) in self.shapes
            ):
                self.count += 1
            return func(*args, **kwargs)

    x = torch.randn(8, 3, 32, 32)
    y = torch.randint(0, 10, (8,))
    config = _config("train.grad_accum=2", "train.batch_size=8", "train.precision=bf16")
    grads, counts = [], []
    for reuse in (True, False):
        torch.manual_seed(0)
        model = visionmoe.create_model("vmoe_debug", dispatch="static", noise_std=0.0)
        experts = [m for m in model.modules() if isinstance(m, Experts)]
        shapes = {tuple(m.w1.shape) for m in experts} | {tuple(m.w2.shape) for m in experts}
        if not reuse:
            for m in experts:
                m.cache_casts = False  # the cast on every forward, as before
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        with WeightCasts(shapes) as casts:
            train_step_device(model, optimizer, x, y, config)
        counts.append(casts.count)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        assert all(m._cast_cache is None and not m._reuse_in_training for m in experts)
    n_weights = 2 * len(experts)
    assert counts == [n_weights, 2 * n_weights]
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name
