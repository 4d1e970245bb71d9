"""Layer-level benchmarks of our SparseMoE: cost vs a dense FFN, BPR savings, expert GEMM speed.

Families (performance targets 1, 3, 4):

- ``layer``: forward+backward time of the MoE layer divided by that of a dense MLP with ``K * F``
  hidden units (the same active FLOPs when no token is dropped) on the same tokens, for every E in
  ``cfg.layer_experts`` and every precision in ``cfg.precisions`` (fp32, bf16 autocast), routing
  groups of ``cfg.group_images`` images. Under autocast both layers cast their weights on every
  training forward (the MoE's E x D x F x 2 elements, E/K times the dense layer's); only
  inference reuses a cached bf16 copy of the expert weights.
- ``bpr``: eval-mode, no-grad time at capacity factor 0.5 over that at 1.0, top-2 with BPR, for
  every E in ``cfg.layer_experts``, dispatch ``auto`` (the static path for inference, whose
  expert buffers are sized by the capacity). Compute follows capacity, so the ideal ratio is
  about 0.5 plus routing.
- ``gemm``: GFLOP/s of ``Experts.forward_chunks`` (the per-expert GEMMs of the compact dispatch)
  over plain ``torch.mm`` on the same total rows, with expert row counts from a real routing.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

import visionmoe
from benchmarks.timing import (
    PRECISION_LABEL,
    BenchConfig,
    compare,
    precision,
    summarize,
    timing_ratio,
    zero_grads,
)
from visionmoe.layers import Mlp, SparseMoE

# (top_k, capacity factor) pairs with performance targets.
LAYER_SETTINGS = ((1, 1.0), (2, 1.25))
DISPATCHES = ("auto", "static")
LAYER_TARGET = 1.15
BPR_TARGET = 0.6
GEMM_TARGET = 0.7


def make_input(cfg: BenchConfig, requires_grad: bool = True) -> Tensor:
    """``(images, tokens_per_image, D)`` activations; grad on, as inside a network."""
    x = torch.randn(cfg.images, cfg.tokens_per_image, cfg.dim)
    return x.requires_grad_(requires_grad)


def make_moe(
    cfg: BenchConfig,
    top_k: int,
    capacity_factor: float,
    dispatch: str = "auto",
    group_size: int | None | str = "config",
    experts: int | None = None,
    **kwargs,
) -> SparseMoE:
    """Our token-choice layer with the benchmark widths and independently drawn experts.

    ``group_size="config"`` routes in groups of ``cfg.group_images`` images; ``experts`` None
    takes ``cfg.experts``.
    """
    return SparseMoE(
        cfg.dim,
        cfg.hidden,
        cfg.experts if experts is None else experts,
        top_k,
        capacity_factor,
        group_size=cfg.group_size if group_size == "config" else group_size,
        dispatch=dispatch,
        expert_init="independent",
        **kwargs,
    )


def make_dense(cfg: BenchConfig, top_k: int) -> Mlp:
    """Dense FFN with ``K * F`` hidden units and tanh GELU: the MoE layer's active FLOPs."""
    return Mlp(cfg.dim, top_k * cfg.hidden, gelu_variant="tanh")


def moe_train_fn(layer: nn.Module, x: Tensor, prec: str = "float32"):
    """Closure: one forward+backward of an MoE layer with loss ``y.sum() + aux.loss``."""

    def step() -> None:
        zero_grads(layer, x)
        with precision(prec):
            y, aux = layer(x)
            loss = y.float().sum() + aux.loss
        loss.backward()

    return step


def dense_train_fn(layer: nn.Module, x: Tensor, prec: str = "float32"):
    """Closure: one forward+backward of a dense layer with loss ``y.sum()``."""

    def step() -> None:
        zero_grads(layer, x)
        with precision(prec):
            loss = layer(x).float().sum()
        loss.backward()

    return step


def run_layer(cfg: BenchConfig) -> dict:
    """Item 1: MoE fwd+bwd / dense fwd+bwd at equal active FLOPs, per E, K, precision, dispatch."""
    results, ratios = {}, []
    groups = "one routing group" if cfg.group_size is None else f"groups of {cfg.group_size}"
    for experts in cfg.layer_experts:
        for top_k, cf in LAYER_SETTINGS:
            torch.manual_seed(cfg.seed)
            x = make_input(cfg)
            dense = make_dense(cfg, top_k)
            layers = {mode: make_moe(cfg, top_k, cf, mode, experts=experts) for mode in DISPATCHES}
            with torch.no_grad():
                tokens = {m: float(v(x)[1].metrics["tokens_processed"]) for m, v in layers.items()}
            for prec in cfg.precisions:
                contenders = {"dense": dense_train_fn(dense, x, prec)}
                for mode, layer in layers.items():
                    contenders[f"moe_{mode}"] = moe_train_fn(layer, x, prec)
                samples = compare(contenders, cfg.repeats, cfg.warmup)
                key = f"e{experts}_top{top_k}_cf{cf:g}_{prec}"
                results[key] = {
                    "experts": experts,
                    "top_k": top_k,
                    "capacity_factor": cf,
                    "precision": prec,
                    "group_size": cfg.group_size,
                    "dense_hidden": top_k * cfg.hidden,
                    "tokens_processed": tokens,
                    "assignments_max": top_k * cfg.tokens,
                    "times_s": {name: summarize(s) for name, s in samples.items()},
                }
                label = f"E={experts} top-{top_k} cf {cf:.2f} {PRECISION_LABEL[prec]}"
                for mode in DISPATCHES:
                    ratios.append(
                        timing_ratio(
                            f"layer.{key}.{mode}",
                            "layer",
                            f"MoE/dense fwd+bwd time, {label}, dispatch {mode}",
                            samples[f"moe_{mode}"],
                            samples["dense"],
                            "<=",
                            LAYER_TARGET,
                            note=f"dense hidden {top_k * cfg.hidden}; T={cfg.tokens}, {groups}",
                        )
                    )
    return {"results": results, "ratios": ratios, "errors": {}}


def run_bpr(cfg: BenchConfig) -> dict:
    """Item 3: inference time at cf 0.5 over cf 1.0, top-2, BPR on, eval mode, no grad, per E."""
    results, ratios = {}, []
    for experts in cfg.layer_experts:
        torch.manual_seed(cfg.seed)
        x = make_input(cfg, requires_grad=False)
        base = make_moe(cfg, 2, 1.0, experts=experts).eval()
        layers = {}
        for cf in (0.5, 1.0):
            layer = copy.deepcopy(base)
            visionmoe.set_routing(layer, capacity_factor=cf, batch_priority=True)
            layers[f"cf{cf:g}"] = layer

        def infer(layer: nn.Module, x: Tensor = x):
            def run() -> None:
                with torch.no_grad():
                    layer(x)

            return run

        samples = compare({k: infer(v) for k, v in layers.items()}, cfg.repeats, cfg.warmup)
        with torch.no_grad():
            processed = {k: float(v(x)[1].metrics["tokens_processed"]) for k, v in layers.items()}
        results[f"bpr_cf_e{experts}"] = {
            "experts": experts,
            "top_k": 2,
            "batch_priority": True,
            "group_size": cfg.group_size,
            "tokens_processed": processed,
            "times_s": {k: summarize(s) for k, s in samples.items()},
        }
        ratios.append(
            timing_ratio(
                f"bpr.e{experts}.cf0.5_vs_cf1",
                "bpr",
                f"Inference time cf 0.5 / cf 1.0 (E={experts}, top-2, BPR, eval, no grad)",
                samples["cf0.5"],
                samples["cf1"],
                "<=",
                BPR_TARGET,
                note=f"expert rows {processed['cf0.5']:.0f} vs {processed['cf1']:.0f}",
            )
        )
    return {"results": results, "ratios": ratios, "errors": {}}


def routed_counts(layer: SparseMoE, x: Tensor) -> list[int]:
    """Rows per expert that the layer's router keeps for ``x`` (what the compact path runs)."""
    with torch.no_grad():
        x_TD = x.reshape(-1, x.shape[-1])
        plan, _ = layer.router(x_TD, layer.group_size)
        kept = plan.expert_idx[plan.keep]
        return torch.bincount(kept, minlength=plan.num_experts).tolist()


def run_gemm(cfg: BenchConfig) -> dict:
    """Item 4: expert GEMM GFLOP/s inside our layer vs ``torch.mm`` on the same rows."""
    torch.manual_seed(cfg.seed)
    layer = make_moe(cfg, 2, 1.25)
    counts = routed_counts(layer, make_input(cfg, requires_grad=False))
    rows = sum(counts)
    x_ND = torch.randn(rows, cfg.dim)
    w1 = torch.randn(cfg.dim, cfg.hidden) * cfg.dim**-0.5
    w2 = torch.randn(cfg.hidden, cfg.dim) * cfg.hidden**-0.5

    def chunks() -> None:
        with torch.no_grad():
            layer.experts.forward_chunks(x_ND, counts)

    def plain_mm() -> None:
        with torch.no_grad():
            torch.mm(torch.mm(x_ND, w1), w2)

    samples = compare({"forward_chunks": chunks, "torch_mm": plain_mm}, cfg.repeats, cfg.warmup)
    flops = 2.0 * rows * cfg.dim * cfg.hidden * 2
    gflops = {k: flops / summarize(s)["median"] / 1e9 for k, s in samples.items()}
    results = {
        "expert_gemm": {
            "counts": counts,
            "rows": rows,
            "flops": flops,
            "gflops": gflops,
            "times_s": {k: summarize(s) for k, s in samples.items()},
        }
    }
    # GFLOP/s ratio = time ratio inverted (same FLOPs on both sides).
    ratio = timing_ratio(
        "gemm.efficiency",
        "gemm",
        "Expert GEMM GFLOP/s (forward_chunks) / torch.mm GFLOP/s",
        samples["torch_mm"],
        samples["forward_chunks"],
        ">=",
        GEMM_TARGET,
        method="median of per-repeat torch.mm time / forward_chunks time",
        note=(
            f"{gflops['forward_chunks']:.1f} vs {gflops['torch_mm']:.1f} GFLOP/s; "
            f"{rows} rows over {len(counts)} experts; forward_chunks includes bias + GELU"
        ),
    )
    return {"results": results, "ratios": [ratio], "errors": {}}
