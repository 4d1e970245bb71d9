"""Tests for routing statistics, routing plots and the HTML inspection report."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import visionmoe
from visionmoe.data import ImageDataset
from visionmoe.eval.report import example_indices, inspect_model
from visionmoe.eval.routing_stats import NO_MOE_MESSAGE, collect_routing, plan_token_routing
from visionmoe.layers.moe import SparseMoE
from visionmoe.routing.plan import RoutingPlan

NUM_IMAGES, NUM_CLASSES, SIZE = 40, 4, 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Debug models are tiny: intra-op threads only add spin-wait overhead on a busy CI box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data() -> ImageDataset:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (NUM_IMAGES, SIZE, SIZE, 3), dtype=np.uint8)
    labels = np.arange(NUM_IMAGES) % NUM_CLASSES
    labels[-4:] = 0  # unbalanced on purpose; class 3 still has images
    return ImageDataset(images, labels, [f"class{i}" for i in range(NUM_CLASSES)])


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return visionmoe.create_model(name)


def _knobs(model: torch.nn.Module) -> list[tuple[float | None, bool]]:
    return [
        (m.router.eval_capacity_factor, m.router.batch_priority)
        for m in model.modules()
        if isinstance(m, SparseMoE)
    ]


@pytest.mark.parametrize("name", ["vmoe_debug", "ecmoe_debug"])
def test_collect_routing_shapes_and_invariants(name: str, data: ImageDataset) -> None:
    model = _model(name)
    stats = collect_routing(model, data.images, data.labels, SIZE, 3, batch_size=16)
    expected_layers = sorted(model.moe_blocks)
    assert stats.sparse_layers == expected_layers
    L = 16 + model.num_prefix
    assert stats.num_tokens == L and stats.num_prefix == model.num_prefix
    assert stats.grid_size == 4
    assert 0.0 <= stats.accuracy <= 1.0
    for index, layer in stats.layers.items():
        assert layer.top1_expert.shape == (NUM_IMAGES, L)
        assert layer.kept.shape == (NUM_IMAGES, L) and layer.kept.dtype == bool
        assert layer.top1_expert.min() >= -1 and layer.top1_expert.max() < 4
        assert layer.load.shape == (4,)
        np.testing.assert_allclose(layer.load.sum(), 1.0)
        assert layer.class_expert.shape == (NUM_CLASSES, 4)
        has_tokens = layer.class_expert_counts.sum(axis=1) > 0
        assert has_tokens.all()
        np.testing.assert_allclose(layer.class_expert.sum(axis=1)[has_tokens], 1.0)
        assert "load_cv2" in stats.metrics[index]
        if layer.expert_choice:
            # A token no expert picked has no top choice, and only those.
            assert ((layer.top1_expert == -1) == ~layer.kept).all()
        else:
            assert (layer.top1_expert >= 0).all()


@pytest.mark.parametrize(("name", "low_cf"), [("vmoe_debug", 0.1), ("ecmoe_debug", 0.25)])
def test_kept_follows_capacity(name: str, low_cf: float, data: ImageDataset) -> None:
    model = _model(name)
    full = collect_routing(model, data.images, data.labels, SIZE, 3, capacity_factor=100.0)
    assert all(layer.kept.all() for layer in full.layers.values())
    low = collect_routing(model, data.images, data.labels, SIZE, 3, capacity_factor=low_cf)
    assert all((~layer.kept).any() for layer in low.layers.values())
    assert all(m["dropped_frac"] > 0 for m in low.metrics.values())


def test_routing_knobs_and_mode_restored(data: ImageDataset) -> None:
    model = _model("vmoe_debug").train()
    visionmoe.set_routing(model, capacity_factor=2.0)
    before = _knobs(model)
    collect_routing(
        model, data.images, data.labels, SIZE, 3, capacity_factor=0.5, batch_priority=True
    )
    assert _knobs(model) == before and model.training
    # Restored on failure too: expert choice cannot honour a capacity below one slot.
    ec = _model("ecmoe_debug").eval()
    before = _knobs(ec)
    with pytest.raises(ValueError):
        collect_routing(ec, data.images, data.labels, SIZE, 3, capacity_factor=0.01)
    assert _knobs(ec) == before and not ec.training


def test_token_choice_top1_is_argmax_gate() -> None:
    torch.manual_seed(0)
    layer = SparseMoE(8, 16, num_experts=4, top_k=2, capacity_factor=0.5).eval()
    plan, gates = layer.router(torch.randn(30, 8), None)
    top1, kept = plan_token_routing(plan, expert_choice=False)
    np.testing.assert_array_equal(top1, gates.argmax(-1).numpy())
    assert not kept.all()  # capacity 0.5 drops tokens, but their top choice is still reported


def test_expert_choice_top1_picks_heaviest_expert() -> None:
    # Token 0 picked by experts 1 (0.2) and 2 (0.7); token 1 by expert 0; token 2 by nobody;
    # a dropped assignment (keep False) must not count.
    plan = RoutingPlan(
        token_idx=torch.tensor([0, 0, 1, 2]),
        expert_idx=torch.tensor([1, 2, 0, 3]),
        slot_idx=torch.zeros(4, dtype=torch.long),
        weight=torch.tensor([0.2, 0.7, 0.5, 0.9]),
        keep=torch.tensor([True, True, True, False]),
        num_tokens=3,
        num_experts=4,
        capacity=1,
        assignments_per_token=1,
        aux_loss=torch.zeros(()),
    )
    top1, kept = plan_token_routing(plan, expert_choice=True)
    assert top1.tolist() == [2, 0, -1]
    assert kept.tolist() == [True, True, False]


def test_example_indices_round_robin() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2])
    assert example_indices(labels, 4).tolist() == [0, 3, 5, 1]
    assert example_indices(labels, 10).tolist() == [0, 3, 5, 1, 4, 2]


def _check_html(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text.lower()
    return text


@pytest.mark.parametrize("name", ["vmoe_debug", "ecmoe_debug"])
def test_inspect_model_writes_report(name: str, data: ImageDataset, tmp_path: Path) -> None:
    model = _model(name)
    report = inspect_model(
        model, data, SIZE, 3, tmp_path, num_examples=3, capacity_factors=(0.25, 1.0)
    )
    assert report == tmp_path / "report.html"
    blocks = sorted(model.moe_blocks)
    expected = ["expert_load.png", "capacity_sweep.png"]
    expected += [f"class_expert_layer{i}.png" for i in blocks]
    for i in (blocks[0], blocks[-1]):
        expected += [f"patch_experts_layer{i}.png", f"dropped_tokens_layer{i}.png"]
    for filename in expected:
        with Image.open(tmp_path / filename) as image:
            assert image.format == "PNG" and image.size[0] > 50
    text = _check_html(report)
    assert text.count("data:image/png;base64,") == len(expected)
    assert "load_cv2" in text
    summary = json.loads((tmp_path / "routing_stats.json").read_text())
    assert set(summary["layers"]) == {str(i) for i in blocks}
    assert [row["capacity_factor"] for row in summary["capacity_sweep"]] == [0.25, 1.0]
    bpr = [row["accuracy_bpr"] for row in summary["capacity_sweep"]]
    assert all(v is None for v in bpr) == (name == "ecmoe_debug")  # expert choice has no BPR


def test_inspect_soft_moe_reports_metrics_only(data: ImageDataset, tmp_path: Path) -> None:
    report = inspect_model(_model("softmoe_debug"), data, SIZE, 3, tmp_path, progress=False)
    text = _check_html(report)
    assert "data:image/png;base64," not in text and "combine_max" in text
    assert not list(tmp_path.glob("*.png"))
    assert json.loads((tmp_path / "routing_stats.json").read_text())["layers"]


def test_dense_model_is_rejected(data: ImageDataset, tmp_path: Path) -> None:
    model = _model("vit_debug")
    with pytest.raises(ValueError, match=NO_MOE_MESSAGE):
        collect_routing(model, data.images, data.labels, SIZE, 3)
    with pytest.raises(ValueError, match="no sparse MoE layers"):
        inspect_model(model, data, SIZE, 3, tmp_path)
