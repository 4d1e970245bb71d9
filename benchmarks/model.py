"""Whole-model throughput: a V-MoE vs its dense twin with equal active FLOPs (performance target 6).

The model is ``cfg.model_name`` with ``cfg.model_overrides`` (by default a ViT-S/16 at 224 px,
D = 384, F = 1536, cut to 4 blocks to keep the run short, with E = 32 top-2 experts in blocks 1
and 3, cf 1.05, routing groups of 8 images). The twin is :func:`visionmoe.models.dense_twin` of
that config: every MoE block becomes a dense MLP with ``K * F`` hidden units (a token that visits
K experts of width F costs the same FLOPs); everything else (attention, embeddings, head) is
identical, so the ratio isolates what routing and dispatch cost inside a real network. Both run
in every precision of ``cfg.precisions`` (fp32, bf16 autocast). Inference uses the eval capacity
factor, training the training one; a training step is forward, backward, gradient clipping and
AdamW, so under autocast it includes casting the updated expert weights once per step.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

import visionmoe
from benchmarks.timing import (
    PRECISION_LABEL,
    BenchConfig,
    compare,
    precision,
    summarize,
    timing_ratio,
)
from visionmoe.models import dense_twin
from visionmoe.train.config import OptimConfig
from visionmoe.train.optim import build_optimizer
from visionmoe.train.step import clip_local

INFER_TARGET = 0.9
TRAIN_TARGET = 0.9
LR = 1e-4
GRAD_CLIP = OptimConfig().grad_clip  # the clipping `visionmoe train` applies by default


def build_models(cfg: BenchConfig) -> tuple[dict[str, nn.Module], object]:
    """``{"moe": ..., "dense": ...}`` built from the same seed, and the MoE config."""
    config = visionmoe.get_config(cfg.model_name, **cfg.model_overrides)
    if config.moe is None or not config.moe_layers:
        raise ValueError(f"{cfg.model_name} with {cfg.model_overrides} has no MoE layers")
    torch.manual_seed(cfg.seed)
    moe = visionmoe.VisionTransformer(config)
    torch.manual_seed(cfg.seed)
    dense = visionmoe.VisionTransformer(dense_twin(config))
    if any(getattr(b, "is_moe", False) for b in dense.blocks):
        raise RuntimeError("the dense twin still has MoE blocks")
    return {"moe": moe, "dense": dense}, config


def make_batch(cfg: BenchConfig, config) -> tuple[torch.Tensor, torch.Tensor]:
    """``cfg.model_batch`` random images and labels for ``config``, drawn from ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    batch = cfg.model_batch
    images = torch.randn(batch, config.in_chans, config.image_size, config.image_size)
    return images, torch.randint(0, max(config.num_classes, 1), (batch,))


def train_step(
    model: nn.Module, opt, images, labels, prec: str, max_norm: float | None = GRAD_CLIP
) -> None:
    """One step of ``visionmoe train``: forward (autocast for bf16), backward, global-norm
    gradient clipping (``clip_local``, as ``visionmoe train`` runs it) and the optimizer update."""
    model.train()
    with precision(prec):
        logits, aux = model(images, return_aux=True)
        loss = F.cross_entropy(logits.float(), labels) + aux.loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    clip_local(model, max_norm)
    opt.step()


def run_model(cfg: BenchConfig) -> dict:
    """Images/s of the MoE model over its dense twin: inference and one AdamW training step."""
    models, config = build_models(cfg)
    batch = cfg.model_batch
    images, labels = make_batch(cfg, config)
    # The optimizer `visionmoe train` builds: AdamW, fused where the parameters allow it.
    optim = OptimConfig(lr=LR)
    optimizers = {k: build_optimizer(m, optim) for k, m in models.items()}
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    results, ratios = {}, []
    twin = f"dense twin: {config.moe.top_k}x-wide MLP at blocks {list(config.moe_layers)}"
    note = f"{cfg.model_name} {cfg.model_overrides}, batch {batch} at {config.image_size}px; {twin}"
    for prec in cfg.precisions:

        def infer(model: nn.Module, prec: str = prec):
            def run() -> None:
                model.eval()
                with torch.no_grad(), precision(prec):
                    model(images)

            return run

        def train(key: str, prec: str = prec):
            return partial(train_step, models[key], optimizers[key], images, labels, prec)

        infer_s = compare({k: infer(m) for k, m in models.items()}, cfg.repeats, cfg.warmup)
        train_s = compare({k: train(k) for k in models}, cfg.repeats, cfg.warmup)

        def ips(samples: dict) -> dict:
            return {k: batch / summarize(s)["median"] for k, s in samples.items()}

        results[f"model_{prec}"] = {
            "name": cfg.model_name,
            "overrides": {
                k: list(v) if isinstance(v, tuple) else v for k, v in cfg.model_overrides.items()
            },
            "precision": prec,
            "batch": batch,
            "image_size": config.image_size,
            "moe_layers": list(config.moe_layers),
            "num_experts": config.moe.num_experts,
            "train_capacity_factor": config.moe.capacity_factor,
            "eval_capacity_factor": config.moe.eval_capacity_factor,
            "dense_twin": twin,
            "params": params,
            "infer_times_s": {k: summarize(s) for k, s in infer_s.items()},
            "train_times_s": {k: summarize(s) for k, s in train_s.items()},
            "infer_images_per_s": ips(infer_s),
            "train_images_per_s": ips(train_s),
        }
        # images/s ratio MoE/dense = time ratio dense/MoE.
        method = "median of per-repeat dense time / MoE time"
        label = f"E={config.moe.num_experts}, {PRECISION_LABEL[prec]}"
        ratios += [
            timing_ratio(
                f"model.infer.{prec}",
                "model",
                f"Inference images/s, MoE / dense twin (eval, no grad), {label}",
                infer_s["dense"],
                infer_s["moe"],
                ">=",
                INFER_TARGET,
                method=method,
                note=note,
            ),
            timing_ratio(
                f"model.train.{prec}",
                "model",
                f"Training step images/s, MoE / dense twin (fwd+bwd+clip+AdamW), {label}",
                train_s["dense"],
                train_s["moe"],
                ">=",
                TRAIN_TARGET,
                method=method,
                note=note,
            ),
        ]
    return {"results": results, "ratios": ratios, "errors": {}}
