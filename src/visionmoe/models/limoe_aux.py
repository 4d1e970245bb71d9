"""LIMoE's contrastive loss, per-modality routing metrics and typed auxiliary outputs.

Shape legend: B batch, T tokens routed by one MoE call (both modalities), E experts.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from visionmoe.layers.moe import MoEAux
from visionmoe.routing.plan import RoutingPlan, routing_metrics

__all__ = ["LIMoEAux", "LIMoELayerAux", "contrastive_loss", "modality_metrics"]


def contrastive_loss(logits_BB: Tensor) -> Tensor:
    """Symmetric InfoNCE: pair i is the positive of row i and of column i.

    ``L = 1/2 * [CE(Z, arange(B)) + CE(Z^T, arange(B))]``, ``Z = exp(log_scale) * u v^T``.
    """
    if logits_BB.ndim != 2 or logits_BB.shape[0] != logits_BB.shape[1]:
        raise ValueError(f"expected square (B, B) logits, got {tuple(logits_BB.shape)}")
    logits_BB = logits_BB.float()
    target = torch.arange(logits_BB.shape[0], device=logits_BB.device)
    return 0.5 * (F.cross_entropy(logits_BB, target) + F.cross_entropy(logits_BB.T, target))


def modality_metrics(plan: RoutingPlan, gates_TE: Tensor, mask_T: Tensor) -> dict[str, Tensor]:
    """:func:`~visionmoe.routing.plan.routing_metrics` of the tokens selected by ``mask_T`` (one
    modality of a mixed routing pool), plus ``num_tokens``; detached."""
    return {**routing_metrics(plan, gates_TE, mask_T), "num_tokens": mask_T.sum().float()}


@dataclass
class LIMoELayerAux:
    """One MoE block of a LIMoE forward.

    Attributes:
      loss: this block's weighted entropy losses (+ classic losses if kept).
      moe: the mixed call: ``plan`` over the T routed tokens in group-major order (per group:
        image tokens, then non-pad text tokens), clean ``gates`` (T, E), mixed-pool metrics.
      is_text: (T,) bool, the modality of each routed token in plan order.
      modality: ``"image"`` / ``"text"`` -> :func:`modality_metrics` plus the unweighted entropy
        losses ``local_entropy_loss`` and ``global_entropy_loss``.
    """

    loss: Tensor
    moe: MoEAux
    is_text: Tensor
    modality: dict[str, MutableMapping[str, Tensor]] = field(default_factory=dict)

    def detached(self) -> LIMoELayerAux:
        """A copy holding no autograd graph."""
        return LIMoELayerAux(self.loss.detach(), self.moe.detached(), self.is_text, self.modality)


@dataclass
class LIMoEAux:
    """Auxiliary outputs of a LIMoE forward: summed routing loss and per-block results."""

    loss: Tensor
    layers: dict[int, LIMoELayerAux] = field(default_factory=dict)

    def detached(self) -> LIMoEAux:
        """A copy holding no autograd graph (what ``model.last_aux`` keeps)."""
        return LIMoEAux(self.loss.detach(), {i: a.detached() for i, a in self.layers.items()})

    def metric_tensors(self, prefix: str = "moe") -> dict[str, Tensor]:
        """0-dim metric tensors as ``moe/layer<i>/<name>`` (mixed pool) and
        ``moe/layer<i>/<modality>/<name>``, left on their device."""
        out = {}
        for index, layer in self.layers.items():
            for name, value in layer.moe.metrics.items():
                if value.numel() == 1:
                    out[f"{prefix}/layer{index}/{name}"] = value.detach().reshape(())
            for modality, metrics in layer.modality.items():
                for name, value in metrics.items():
                    if value.numel() == 1:
                        out[f"{prefix}/layer{index}/{modality}/{name}"] = value.detach().reshape(())
        return out

    def metrics(self, prefix: str = "moe") -> dict[str, float]:
        """:meth:`metric_tensors` as plain floats."""
        return {k: float(v) for k, v in self.metric_tensors(prefix).items()}
