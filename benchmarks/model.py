"""Whole-model throughput: a V-MoE vs its dense twin with equal active FLOPs (performance target 6).

The twin is the same registered model built with ``moe_layers=()`` (all blocks dense), whose
blocks at the MoE positions then get a dense MLP with ``K * F`` hidden units: a token that visits
K experts of width F costs the same FLOPs as one pass through that MLP. Everything else
(attention, embeddings, head) is identical, so the ratio isolates what routing and dispatch cost
inside a real network. Inference uses each model's eval capacity (the registered config's), so
tokens are not dropped and the FLOPs really are equal; training uses the training capacity.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

import visionmoe
from benchmarks.timing import BenchConfig, compare, summarize, timing_ratio
from visionmoe.layers import Mlp

INFER_TARGET = 0.9
TRAIN_TARGET = 0.85
LR = 1e-4


def build_dense_twin(name: str, **overrides) -> tuple[nn.Module, str]:
    """The dense twin of registered MoE model ``name`` and how it was built."""
    config = visionmoe.get_config(name, **overrides)
    if config.moe is None or not config.moe_layers:
        raise ValueError(f"{name} has no MoE layers to replace")
    try:
        model = visionmoe.create_model(name, moe_layers=(), **overrides)
        how = "create_model(name, moe_layers=())"
    except (ValueError, TypeError):
        dense_cfg = dataclasses.replace(config, moe=None, moe_layers=())
        model = visionmoe.VisionTransformer(dense_cfg)
        how = "dataclasses.replace(config, moe=None, moe_layers=())"
    if any(getattr(b, "is_moe", False) for b in model.blocks):
        raise RuntimeError(f"dense twin of {name} still has MoE blocks")
    hidden = config.moe.top_k * config.mlp_dim
    for index in config.moe_layers:
        model.blocks[index].ffn = Mlp(config.hidden_size, hidden, config.gelu, config.dropout)
    how += f" + Mlp({config.hidden_size}, {hidden}) at blocks {list(config.moe_layers)}"
    return model, how


def run_model(cfg: BenchConfig) -> dict:
    """Images/s of the MoE model over its dense twin: inference and one AdamW training step."""
    torch.manual_seed(cfg.seed)
    config = visionmoe.get_config(cfg.model_name, **cfg.model_overrides)
    models = {
        "moe": visionmoe.create_model(cfg.model_name, **cfg.model_overrides),
    }
    models["dense"], twin_how = build_dense_twin(cfg.model_name, **cfg.model_overrides)
    batch = cfg.model_batch
    images = torch.randn(batch, config.in_chans, config.image_size, config.image_size)
    labels = torch.randint(0, max(config.num_classes, 1), (batch,))
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=LR) for k, m in models.items()}

    def infer(model: nn.Module):
        def run() -> None:
            model.eval()
            with torch.no_grad():
                model(images)

        return run

    def train(key: str):
        model, opt = models[key], optimizers[key]

        def run() -> None:
            model.train()
            logits, aux = model(images, return_aux=True)
            loss = F.cross_entropy(logits, labels) + aux.loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return run

    infer_s = compare({k: infer(m) for k, m in models.items()}, cfg.repeats, cfg.warmup)
    train_s = compare({k: train(k) for k in models}, cfg.repeats, cfg.warmup)
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}

    def ips(samples: dict) -> dict:
        return {k: batch / summarize(s)["median"] for k, s in samples.items()}

    results = {
        "model": {
            "name": cfg.model_name,
            "overrides": cfg.model_overrides,
            "batch": batch,
            "image_size": config.image_size,
            "moe_layers": list(config.moe_layers),
            "train_capacity_factor": config.moe.capacity_factor,
            "eval_capacity_factor": config.moe.eval_capacity_factor,
            "dense_twin": twin_how,
            "params": params,
            "infer_times_s": {k: summarize(s) for k, s in infer_s.items()},
            "train_times_s": {k: summarize(s) for k, s in train_s.items()},
            "infer_images_per_s": ips(infer_s),
            "train_images_per_s": ips(train_s),
        }
    }
    note = f"{cfg.model_name}, batch {batch} at {config.image_size}px; twin: {twin_how}"
    # images/s ratio MoE/dense = time ratio dense/MoE.
    method = "median of per-repeat dense time / MoE time"
    ratios = [
        timing_ratio(
            "model.infer",
            "model",
            "Inference images/s, MoE / dense twin (eval, no grad)",
            infer_s["dense"],
            infer_s["moe"],
            ">=",
            INFER_TARGET,
            method=method,
            note=note,
        ),
        timing_ratio(
            "model.train",
            "model",
            "Training step images/s, MoE / dense twin (fwd+bwd+AdamW)",
            train_s["dense"],
            train_s["moe"],
            ">=",
            TRAIN_TARGET,
            method=method,
            note=note,
        ),
    ]
    return {"results": results, "ratios": ratios, "errors": {}}
