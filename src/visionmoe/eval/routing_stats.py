"""Routing statistics of a trained (or random) MoE model over a labelled image set.

Shape legend: N images, L tokens per image (class token included), E experts, A assignments.

The figures of the V-MoE paper (expert load, class/expert specialisation, patch-to-expert maps,
dropped tokens under Batch Priority Routing) all derive from one thing: which expert each token
went to and whether it was kept. :func:`collect_routing` runs the model once over the images and
reduces every sparse layer's :class:`~visionmoe.routing.plan.RoutingPlan` to per-token numpy
arrays, so plotting and reporting never touch torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from visionmoe.data.transforms import to_model_input
from visionmoe.layers.moe import SoftMoE, SparseMoE
from visionmoe.routing.expert_choice import ExpertChoiceRouter
from visionmoe.routing.plan import RoutingPlan

__all__ = [
    "MODALITY_ROWS",
    "NO_MOE_MESSAGE",
    "LayerRouting",
    "ModalityRouting",
    "RoutingStats",
    "collect_modality_routing",
    "collect_routing",
    "moe_layers",
    "plan_token_routing",
]

NO_MOE_MESSAGE = "model has no sparse MoE layers to inspect"

# How a per-batch scalar metric is reduced over batches; anything not listed is a mean weighted by
# the batch size. A mean of per-batch minima would hide the one batch where an expert starved.
_REDUCE = {
    "tokens_processed": "sum",
    "experts_per_token_min": "min",
    "experts_per_token_max": "max",
}


@dataclass
class LayerRouting:
    """Routing of one sparse MoE layer over the whole image set.

    Attributes:
      top1_expert: (N, L) int64 top-choice expert per token; for expert choice the expert with the
        largest combine weight among those that picked the token, -1 if none did.
      kept: (N, L) bool, the token has at least one kept assignment (was processed by an expert).
      load: (E,) fraction of all kept assignments that went to each expert.
      class_expert: (num_classes, E) per class, the fraction of its patch tokens (class token
        excluded) whose top choice is each expert; all-zero rows for classes without images.
      class_expert_counts: the same before row normalisation.
      num_experts: E.
      expert_choice: whether the layer's experts pick tokens (changes what ``top1_expert`` means).
    """

    top1_expert: np.ndarray
    kept: np.ndarray
    load: np.ndarray
    class_expert: np.ndarray
    class_expert_counts: np.ndarray
    num_experts: int
    expert_choice: bool = False

    @property
    def dropped_frac(self) -> float:
        """Fraction of tokens (all positions) that no expert processed."""
        return float(1.0 - self.kept.mean()) if self.kept.size else 0.0


@dataclass
class RoutingStats:
    """Everything :func:`collect_routing` measured.

    Attributes:
      layers: block index -> :class:`LayerRouting` for every sparse (plan-producing) MoE layer.
      metrics: block index -> scalar router metrics reduced over batches, for every MoE layer,
        Soft MoE included (see ``_REDUCE`` for how each metric is reduced).
      accuracy: top-1 accuracy of the model on the images.
      num_images, num_tokens, num_prefix, grid_size: N, L, prefix (class) tokens, patch grid side.
      capacity_factor, batch_priority: the eval routing knobs the images were routed with
        (None: the model's own settings were left as they were).
    """

    layers: dict[int, LayerRouting]
    metrics: dict[int, dict[str, float]]
    accuracy: float
    num_images: int
    num_tokens: int
    num_prefix: int
    grid_size: int
    capacity_factor: float | None = None
    batch_priority: bool | None = None
    predictions: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def sparse_layers(self) -> list[int]:
        """Block indices of the sparse layers, in depth order."""
        return sorted(self.layers)


def moe_layers(model: nn.Module) -> dict[int, nn.Module]:
    """Block index -> MoE layer (sparse or soft) of a :class:`VisionTransformer`-like model."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"expected a VisionTransformer with .blocks, got {type(model).__name__}")
    return {
        i: block.ffn
        for i, block in enumerate(blocks)
        if isinstance(getattr(block, "ffn", None), (SparseMoE, SoftMoE))
    }


def plan_token_routing(plan: RoutingPlan, expert_choice: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-token ``(top1_expert (T,), kept (T,))`` from a plan.

    Token choice lists assignments as ``t * K + k`` with k=0 the router's first pick, so the top
    choice is read directly, even when that assignment was dropped and a later pick was kept: it
    is what the router *preferred*, which is what the specialisation figures show. Expert choice
    has no per-token ranking; the expert whose combine weight is largest stands in for it.
    """
    T = plan.num_tokens
    token = plan.token_idx.detach().cpu().numpy()
    expert = plan.expert_idx.detach().cpu().numpy()
    keep = plan.keep.detach().cpu().numpy().astype(bool)
    kept = np.zeros(T, dtype=bool)
    kept[token[keep]] = True
    if not expert_choice:
        K = plan.assignments_per_token
        return expert.reshape(T, K)[:, 0].astype(np.int64), kept
    top1 = np.full(T, -1, dtype=np.int64)
    weight = plan.weight.detach().float().cpu().numpy()[keep]
    token, expert = token[keep], expert[keep]
    if token.size:
        # Sort by token, then weight: the last entry of each token's run is its strongest expert.
        # (Fancy assignment with repeated indices has no guaranteed winner, so avoid relying on it.)
        order = np.lexsort((weight, token))
        token, expert = token[order], expert[order]
        last = np.append(token[1:] != token[:-1], True)
        top1[token[last]] = expert[last]
    return top1, kept


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters(), None)
    if param is None:
        return torch.device("cpu"), torch.float32
    return param.device, param.dtype if param.is_floating_point() else torch.float32


def _batches(num: int, batch_size: int, progress: bool) -> Iterable[int]:
    starts: Iterable[int] = range(0, num, batch_size)
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm is optional for a progress bar only
            return starts
        return tqdm(starts, desc="routing", unit="batch", leave=False)
    return starts


class _MetricAccumulator:
    """Reduces per-batch scalar metrics of one layer according to ``_REDUCE``."""

    def __init__(self) -> None:
        self.values: dict[str, list[tuple[float, int]]] = {}

    def add(self, metrics: dict[str, torch.Tensor], weight: int) -> None:
        for name, value in metrics.items():
            if value.numel() == 1:
                self.values.setdefault(name, []).append((float(value), weight))

    def result(self) -> dict[str, float]:
        out = {}
        for name, pairs in self.values.items():
            vals = np.array([v for v, _ in pairs], dtype=np.float64)
            weights = np.array([w for _, w in pairs], dtype=np.float64)
            how = _REDUCE.get(name, "mean")
            if how == "sum":
                out[name] = float(vals.sum())
            elif how == "min":
                out[name] = float(vals.min())
            elif how == "max":
                out[name] = float(vals.max())
            else:
                out[name] = float((vals * weights).sum() / max(weights.sum(), 1.0))
        return out


def collect_routing(
    model: nn.Module,
    images_uint8: np.ndarray,
    labels: np.ndarray,
    image_size: int,
    channels: int,
    batch_size: int = 256,
    capacity_factor: float | None = None,
    batch_priority: bool | None = None,
    *,
    num_classes: int | None = None,
    progress: bool = False,
) -> RoutingStats:
    """Route ``images_uint8 (N, H, W, C)`` through ``model`` in eval mode; record each token.

    ``capacity_factor`` / ``batch_priority`` override the eval routing knobs of every sparse layer
    for this call only (``None`` keeps the model's); the previous knobs and the train/eval mode are
    restored afterwards, even on error, so inspecting a model mid-training leaves it untouched.
    Routing groups may span several images (V-MoE), so results depend on ``batch_size`` and image
    order when capacity binds. ``num_classes`` sizes ``class_expert`` (default: largest label + 1).

    Raises ValueError (``NO_MOE_MESSAGE``) when the model has no MoE layer at all. Soft MoE layers
    have no routing plan: they contribute metrics only.
    """
    from visionmoe.models.routing_control import set_routing

    layers = moe_layers(model)
    if not layers:
        raise ValueError(NO_MOE_MESSAGE)
    images_uint8 = np.asarray(images_uint8)
    labels = np.asarray(labels, dtype=np.int64)
    if images_uint8.ndim != 4 or labels.shape != (images_uint8.shape[0],):
        raise ValueError(
            f"expected images (N, H, W, C) and labels (N,), got {images_uint8.shape} and "
            f"{labels.shape}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    N = images_uint8.shape[0]
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if N else 0
    sparse = {i: m for i, m in layers.items() if isinstance(m, SparseMoE)}
    saved = {i: (m.router.eval_capacity_factor, m.router.batch_priority) for i, m in sparse.items()}
    was_training = model.training
    device, dtype = _model_device_dtype(model)
    num_prefix = int(getattr(model, "num_prefix", 0))
    top1: dict[int, list[np.ndarray]] = {i: [] for i in sparse}
    kept: dict[int, list[np.ndarray]] = {i: [] for i in sparse}
    kept_per_expert = {i: np.zeros(m.router.num_experts, dtype=np.int64) for i, m in sparse.items()}
    accumulators = {i: _MetricAccumulator() for i in layers}
    predictions = np.zeros(N, dtype=np.int64)
    try:
        model.eval()
        set_routing(model, capacity_factor=capacity_factor, batch_priority=batch_priority)
        with torch.no_grad():
            for start in _batches(N, batch_size, progress):
                chunk = images_uint8[start : start + batch_size]
                x = to_model_input(chunk, image_size, channels).to(device=device, dtype=dtype)
                logits, aux = model(x, return_aux=True)
                predictions[start : start + len(chunk)] = logits.argmax(-1).cpu().numpy()
                for index, layer_aux in aux.layers.items():
                    accumulators[index].add(layer_aux.metrics, len(chunk))
                    plan = layer_aux.plan
                    if plan is None or index not in sparse:
                        continue
                    ec = isinstance(sparse[index].router, ExpertChoiceRouter)
                    first, keep = plan_token_routing(plan, ec)
                    top1[index].append(first.reshape(len(chunk), -1))
                    kept[index].append(keep.reshape(len(chunk), -1))
                    kept_experts = plan.expert_idx[plan.keep].cpu().numpy()
                    kept_per_expert[index] += np.bincount(kept_experts, minlength=plan.num_experts)
    finally:
        for i, m in sparse.items():
            m.router.eval_capacity_factor, m.router.batch_priority = saved[i]
        model.train(was_training)
    num_tokens = int(getattr(getattr(model, "patch_embed", None), "num_patches", 0)) + num_prefix
    out: dict[int, LayerRouting] = {}
    for index, module in sparse.items():
        E = module.router.num_experts
        first = np.concatenate(top1[index]) if top1[index] else np.zeros((0, num_tokens), int)
        keep = np.concatenate(kept[index]) if kept[index] else np.zeros((0, num_tokens), bool)
        patches = first[:, num_prefix:]
        counts = np.zeros((num_classes, E), dtype=np.int64)
        valid = patches >= 0
        rows = np.broadcast_to(labels[:, None], patches.shape)[valid]
        np.add.at(counts, (rows, patches[valid]), 1)
        totals = counts.sum(axis=1, keepdims=True)
        fractions = counts / np.maximum(totals, 1)
        load = kept_per_expert[index] / max(int(kept_per_expert[index].sum()), 1)
        out[index] = LayerRouting(
            top1_expert=first.astype(np.int64),
            kept=keep.astype(bool),
            load=load.astype(np.float64),
            class_expert=fractions.astype(np.float64),
            class_expert_counts=counts,
            num_experts=E,
            expert_choice=isinstance(module.router, ExpertChoiceRouter),
        )
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", 0)
    return RoutingStats(
        layers=out,
        metrics={i: acc.result() for i, acc in accumulators.items()},
        accuracy=float((predictions == labels).mean()) if N else float("nan"),
        num_images=N,
        num_tokens=num_tokens,
        num_prefix=num_prefix,
        grid_size=int(grid),
        capacity_factor=capacity_factor,
        batch_priority=batch_priority,
        predictions=predictions,
    )


@dataclass
class ModalityRouting:
    """Expert usage of an image-text (LIMoE) model, per MoE block and modality.

    Attributes:
      load: block -> (2, E) per modality (rows ``MODALITY_ROWS``), the fraction of its kept
        assignments that went to each expert.
      counts: block -> (2, E) kept assignment counts behind ``load``.
      metrics: block -> modality -> scalar metrics reduced over batches (see ``_REDUCE``);
        modality ``"mixed"`` holds the metrics of the whole mixed routing pool.
      num_pairs: image-text pairs routed.
    """

    load: dict[int, np.ndarray]
    counts: dict[int, np.ndarray]
    metrics: dict[int, dict[str, dict[str, float]]]
    num_pairs: int


MODALITY_ROWS = ("image", "text")


def collect_modality_routing(
    model: nn.Module,
    images_uint8: np.ndarray,
    tokens: torch.Tensor,
    image_size: int,
    channels: int,
    batch_size: int = 256,
) -> ModalityRouting:
    """Route image-text pairs through a LIMoE ``model`` together (as in training), in eval mode.

    Pairs are batched as in training, so routing groups mix image and text tokens and the two
    modalities compete for capacity; the model's train/eval mode is restored afterwards.
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError(NO_MOE_MESSAGE)
    N = len(images_uint8)
    if tokens.shape[0] != N:
        raise ValueError(f"{N} images but {tokens.shape[0]} texts")
    counts = {i: np.zeros((2, m.router.num_experts), dtype=np.int64) for i, m in layers.items()}
    accumulators: dict[int, dict[str, _MetricAccumulator]] = {i: {} for i in layers}
    was_training = model.training
    device, dtype = _model_device_dtype(model)
    try:
        model.eval()
        with torch.no_grad():
            for start in range(0, N, batch_size):
                chunk = images_uint8[start : start + batch_size]
                x = to_model_input(chunk, image_size, channels).to(device=device, dtype=dtype)
                _, aux = model(x, tokens[start : start + batch_size].to(device), return_aux=True)
                for index, layer in aux.layers.items():
                    plan = layer.moe.plan
                    kept = plan.keep.cpu().numpy()
                    text = layer.is_text[plan.token_idx].cpu().numpy()
                    expert = plan.expert_idx.cpu().numpy()
                    for row, is_text in enumerate((False, True)):
                        sel = kept & (text == is_text)
                        counts[index][row] += np.bincount(expert[sel], minlength=plan.num_experts)
                    groups = {"mixed": layer.moe.metrics, **layer.modality}
                    for name, metrics in groups.items():
                        acc = accumulators[index].setdefault(name, _MetricAccumulator())
                        acc.add(metrics, len(chunk))
    finally:
        model.train(was_training)
    load = {i: c / np.maximum(c.sum(axis=1, keepdims=True), 1) for i, c in counts.items()}
    metrics = {i: {k: a.result() for k, a in accs.items()} for i, accs in accumulators.items()}
    return ModalityRouting(load=load, counts=counts, metrics=metrics, num_pairs=N)
