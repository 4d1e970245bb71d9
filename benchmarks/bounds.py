"""How far the targets can be reached at all: bounds from work no kernel choice removes.

Under bf16 autocast the parameters stay float32, so every training step casts the expert
weights to bf16 (E x D x F x 2 float32 values read, as many bf16 values written) and their bf16
gradients back to float32. These passes stream memory, whatever the experts' GEMMs are; the
dense FFN of equal active FLOPs casts K/E as much. A training step also clips and updates every
parameter (``clip_local`` + fused AdamW), and an MoE block has E/K times the parameters of its
dense twin's MLP. Two families of informational rows (no target of their own) put these costs
next to the time they must fit in, measured side by side in one run:

- ``bounds.layer``: (dense FFN fwd+bwd + expert-weight casts) / dense FFN fwd+bwd under bf16
  autocast, for every E in ``cfg.layer_experts`` and K in {1, 2}: the MoE/dense time ratio the
  layer would have if routing, dispatch and the expert GEMMs cost no more than the dense
  layer's. A value above the layer target (1.15) means that target is out of reach there.
- ``bounds.model``: dense twin step / (dense twin step + the MoE model's extra clip + AdamW time
  [+ its expert-weight casts in bf16]): the highest images/s ratio the whole-model training step
  can reach when everything else in the MoE model costs what the twin's does. Below the target
  (0.9), that target is out of reach at this batch size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from benchmarks.layer import dense_train_fn, make_dense, make_input
from benchmarks.model import GRAD_CLIP, LR, build_models, make_batch, train_step
from benchmarks.timing import (
    PRECISION_LABEL,
    BenchConfig,
    compare,
    paired_ratio,
    ratio_record,
    summarize,
)
from visionmoe.layers.experts import Experts
from visionmoe.train.config import OptimConfig
from visionmoe.train.optim import build_optimizer
from visionmoe.train.step import clip_local

TOP_KS = (1, 2)
METHOD = "median of per-repeat ratios of interleaved timings"


def cast_fn(weights: list[Tensor]):
    """Closure: what autocast does per step with these float32 weights, as plain copies: each
    cast to bf16, and a bf16 gradient of the same shape cast to float32."""
    grads = [torch.zeros_like(w, dtype=torch.bfloat16) for w in weights]

    def run() -> None:
        for w, g in zip(weights, grads, strict=True):
            w.to(torch.bfloat16)
            g.float()

    return run


def expert_weights(model: torch.nn.Module) -> list[Tensor]:
    """The stacked ``w1``/``w2`` of every expert bank (biases are E x (F + D): negligible)."""
    banks = [m for m in model.modules() if isinstance(m, Experts)]
    return [w.detach() for bank in banks for w in (bank.w1, bank.w2)]


def _row(rid: str, metric: str, numerator: list[float], denominator: list[float], note: str):
    r = paired_ratio(numerator, denominator)
    kwargs = {"lo": r["lo"], "hi": r["hi"], "method": METHOD, "note": note}
    return ratio_record(rid, "bounds", metric, r["value"], None, None, **kwargs)


def layer_floors(cfg: BenchConfig) -> tuple[dict, list[dict]]:
    results, rows = {}, []
    torch.manual_seed(cfg.seed)
    x = make_input(cfg)
    for experts in cfg.layer_experts:
        weights = [
            torch.randn(experts, cfg.dim, cfg.hidden),
            torch.randn(experts, cfg.hidden, cfg.dim),
        ]
        for top_k in TOP_KS:
            dense = make_dense(cfg, top_k)
            contenders = {
                "dense": dense_train_fn(dense, x, "bfloat16"),
                "casts": cast_fn(weights),
            }
            s = compare(contenders, cfg.repeats, cfg.warmup)
            key = f"e{experts}_top{top_k}"
            results[f"layer_{key}"] = {k: summarize(v) for k, v in s.items()}
            floor = [d + c for d, c in zip(s["dense"], s["casts"], strict=True)]
            rows.append(
                _row(
                    f"bounds.layer.{key}",
                    f"Floor of MoE/dense fwd+bwd time from the expert-weight casts alone, "
                    f"E={experts} top-{top_k} bf16 autocast",
                    floor,
                    s["dense"],
                    f"casts of {experts} x {cfg.dim} x {cfg.hidden} x 2 weights and their "
                    f"gradients; dense hidden {top_k * cfg.hidden}; T={cfg.tokens}",
                )
            )
    return results, rows


def model_ceilings(cfg: BenchConfig) -> tuple[dict, list[dict]]:
    models, config = build_models(cfg)
    images, labels = make_batch(cfg, config)
    optimizers = {k: build_optimizer(m, OptimConfig(lr=LR)) for k, m in models.items()}

    # Gradients small enough that clipping scales the MoE's by 1 (it still runs); the dense
    # twin's come from its training step, which runs between its updates.
    for model in models.values():
        for p in model.parameters():
            p.grad = torch.full_like(p, 1e-5)

    def update(key: str):
        def run() -> None:
            clip_local(models[key], GRAD_CLIP)
            optimizers[key].step()

        return run

    casts = cast_fn(expert_weights(models["moe"]))
    results, rows = {}, []
    for prec in cfg.precisions:
        contenders = {
            "dense_step": lambda prec=prec: train_step(
                models["dense"], optimizers["dense"], images, labels, prec
            ),
            "moe_update": update("moe"),
            "dense_update": update("dense"),
        }
        if prec == "bfloat16":
            contenders["casts"] = casts
        s = compare(contenders, cfg.repeats, cfg.warmup)
        results[f"model_{prec}"] = {k: summarize(v) for k, v in s.items()}
        extra = [m - d for m, d in zip(s["moe_update"], s["dense_update"], strict=True)]
        if prec == "bfloat16":
            extra = [e + c for e, c in zip(extra, s["casts"], strict=True)]
        ceiling = [d + e for d, e in zip(s["dense_step"], extra, strict=True)]
        casts_note = " + expert-weight casts" if prec == "bfloat16" else ""
        rows.append(
            _row(
                f"bounds.model.{prec}",
                f"Ceiling of training-step images/s MoE / dense twin from clip + AdamW over all "
                f"parameters{casts_note}, {PRECISION_LABEL[prec]}",
                s["dense_step"],
                ceiling,
                f"{cfg.model_name} {cfg.model_overrides}, batch {cfg.model_batch}",
            )
        )
    return results, rows


def run_bounds(cfg: BenchConfig) -> dict:
    """Layer floors and whole-model ceilings (see the module docstring)."""
    layer_results, layer_rows = layer_floors(cfg)
    model_results, model_rows = model_ceilings(cfg)
    return {
        "results": {**layer_results, **model_results},
        "ratios": layer_rows + model_rows,
        "errors": {},
    }
