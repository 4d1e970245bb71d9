"""Our layers vs the public PyTorch MoE libraries at the same configuration (performance target 2).

Peers are imported lazily and driven only through their public constructors and ``forward``; a
peer that is not installed or fails to build or run on CPU is recorded with its error and the
rest of the comparison goes on.

Mapping of settings (why each choice makes the configurations equal):

- Routing groups: both token-choice peers route each batch row as one group and size capacity
  per row, so they get ``(images, tokens_per_image, D)`` and our layer gets
  ``group_size=tokens_per_image``: the same groups of tokens.
- Capacity: the peers compute ``max(4, min(S, int(S * cf / E)))`` slots per expert and group, with
  no factor K, while we use ``K * S * cf / E`` rounded up (to a multiple of 4). We compute our slot
  count C and give the peers ``cf = (C + 0.5) * E / S``, so every library has exactly C slots.
- Second choice: both peers by default send a token to its second expert only with probability
  ``gate2 / 0.2``; we always route both. ``mixture-of-experts`` gets ``second_policy='all'``;
  ``st-moe-pytorch`` gets a threshold of 1e-9, so the routing probability is >= 1.
- Expert width: ``mixture-of-experts`` takes ``hidden_dim=F`` (no biases, GELU passed in as tanh
  GELU). ``st-moe-pytorch`` has a fixed GEGLU expert with ``h = int(D * mult * 2 / 3)`` hidden
  units and two input projections; ``mult = F / D`` gives ``h = 2F/3``, the same parameters and
  FLOPs per token as our ``D -> F -> D`` MLP. ``soft-moe-pytorch`` takes ``expert_mult = F / D``
  (so ``F`` hidden units, exact GELU).
- Soft MoE: ``soft_experts`` experts x ``soft_slots`` slots in both; the peer's CPU offloading of
  idle experts is turned off (it only costs time on a single device).
- Our routers keep their defaults otherwise (V-MoE noisy gating and its two auxiliary losses), a
  little extra work the peers do not do.

"fwd" is inference (eval mode, no grad, eval capacity set to the same value); "fwd+bwd" is
training mode with loss ``output.sum() + aux_loss``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn

from benchmarks.layer import make_input, make_moe
from benchmarks.timing import (
    BenchConfig,
    compare,
    error_text,
    ratio_record,
    summarize,
    timing_ratio,
    zero_grads,
)
from visionmoe.layers import SoftMoE
from visionmoe.routing.capacity import compute_capacity

TOP_K = 2
CAPACITY_FACTOR = 1.25
TOKEN_CHOICE_TARGET = 2.0
SOFT_TARGET = 1.5
TOKEN_CHOICE_PEERS = ("st_moe_pytorch", "mixture_of_experts")
SECOND_THRESHOLD = 1e-9
PHASES = ("fwd", "fwd_bwd")
PHASE_LABEL = {"fwd": "fwd (eval, no grad)", "fwd_bwd": "fwd+bwd"}


def peer_capacity_factor(cfg: BenchConfig) -> tuple[int, float]:
    """Our slots per expert and group, and the peer capacity factor that yields the same count."""
    slots = compute_capacity(cfg.tokens_per_image, cfg.experts, TOP_K, CAPACITY_FACTOR)
    return slots, (slots + 0.5) * cfg.experts / cfg.tokens_per_image


def build_st_moe(cfg: BenchConfig) -> nn.Module:
    from st_moe_pytorch import MoE

    _, peer_cf = peer_capacity_factor(cfg)
    return MoE(
        dim=cfg.dim,
        num_experts=cfg.experts,
        expert_hidden_mult=cfg.hidden / cfg.dim,
        gating_top_n=TOP_K,
        threshold_train=SECOND_THRESHOLD,
        threshold_eval=SECOND_THRESHOLD,
        capacity_factor_train=peer_cf,
        capacity_factor_eval=peer_cf,
    )


def build_mixture_of_experts(cfg: BenchConfig) -> nn.Module:
    from mixture_of_experts import MoE

    _, peer_cf = peer_capacity_factor(cfg)
    return MoE(
        dim=cfg.dim,
        num_experts=cfg.experts,
        hidden_dim=cfg.hidden,
        activation=functools.partial(nn.GELU, approximate="tanh"),
        second_policy_train="all",
        second_policy_eval="all",
        capacity_factor_train=peer_cf,
        capacity_factor_eval=peer_cf,
    )


def build_soft_moe_pytorch(cfg: BenchConfig) -> nn.Module:
    from soft_moe_pytorch import SoftMoE as PeerSoftMoE

    return PeerSoftMoE(
        dim=cfg.dim,
        num_experts=cfg.soft_experts,
        num_slots=cfg.soft_slots,
        expert_mult=cfg.hidden / cfg.dim,
        offload_unused_experts_to_cpu=False,
    )


def _st_moe_loss(out) -> Tensor:
    return out.outputs.sum() + out.total_aux_loss


def _tuple_loss(out) -> Tensor:
    y, aux = out
    return y.sum() + aux


def _ours_loss(out) -> Tensor:
    y, aux = out
    return y.sum() + aux.loss


def _plain_loss(out) -> Tensor:
    return out.sum()


PEER_BUILDERS: dict[str, tuple[Callable[[BenchConfig], nn.Module], Callable]] = {
    "st_moe_pytorch": (build_st_moe, _st_moe_loss),
    "mixture_of_experts": (build_mixture_of_experts, _tuple_loss),
    "soft_moe_pytorch": (build_soft_moe_pytorch, _plain_loss),
}


def phase_fns(module: nn.Module, x: Tensor, loss_of: Callable) -> dict[str, Callable[[], None]]:
    """``fwd`` (eval, no grad) and ``fwd_bwd`` (train mode) closures for one contender."""

    def fwd() -> None:
        module.eval()
        with torch.no_grad():
            module(x)

    def fwd_bwd() -> None:
        module.train()
        zero_grads(module, x)
        loss_of(module(x)).backward()

    return {"fwd": fwd, "fwd_bwd": fwd_bwd}


def _try_peer(name: str, cfg: BenchConfig, x: Tensor, errors: dict) -> dict | None:
    """Build a peer and run each phase once; on any failure record why and return None."""
    builder, loss_of = PEER_BUILDERS[name]
    try:
        torch.manual_seed(cfg.seed)
        fns = phase_fns(builder(cfg), x, loss_of)
        for fn in fns.values():
            fn()
        return fns
    except Exception as exc:  # any peer failure is data, not a crash
        errors[name] = error_text(exc)
        return None


def peer_group_images(cfg: BenchConfig) -> list[int]:
    """Routing groups to compare at: one image (the peers' own grouping) and ``group_images``."""
    sizes = [1]
    g = cfg.group_images
    if g is not None and 1 < g <= cfg.images and cfg.images % g == 0:
        sizes.append(g)
    return sizes


def run_peers(cfg: BenchConfig) -> dict:
    """Time ours and each peer in both phases, interleaved; speedups are peer time / ours.

    Token choice runs at every group size of :func:`peer_group_images`: the peers route each
    batch row as one group, so a group of g images is the input viewed as ``(B / g, g * L, D)``
    (ours gets the same view and ``group_size = g * L``). The peers' dense one-hot dispatch and
    combine tensors are ``(groups, S, E, C)`` with C proportional to S, so their cost per token
    grows with the group size S while ours does not.
    """
    errors: dict[str, str] = {}
    results: dict[str, dict] = {}
    ratios: list[dict] = []
    for group in peer_group_images(cfg):
        gcfg = dataclasses.replace(
            cfg, images=cfg.images // group, tokens_per_image=group * cfg.tokens_per_image
        )
        suffix = "" if group == 1 else f".group{group}"
        _run_token_choice(gcfg, group, suffix, errors, results, ratios)
    torch.manual_seed(cfg.seed)
    x = make_input(cfg)

    # Soft MoE at equal experts x slots.
    torch.manual_seed(cfg.seed)
    ours_soft = SoftMoE(
        cfg.dim, cfg.hidden, cfg.soft_experts, cfg.soft_slots, expert_init="independent"
    )
    soft = {"visionmoe": phase_fns(ours_soft, x, _ours_loss)}
    fns = _try_peer("soft_moe_pytorch", cfg, x, errors)
    if fns is not None:
        soft["soft_moe_pytorch"] = fns
    for phase in PHASES:
        samples = compare({k: v[phase] for k, v in soft.items()}, cfg.repeats, cfg.warmup)
        results[f"soft.{phase}"] = {
            "experts": cfg.soft_experts,
            "slots_per_expert": cfg.soft_slots,
            "times_s": {k: summarize(s) for k, s in samples.items()},
        }
        rid = f"peers.soft.{phase}"
        metric = f"Speedup over soft-moe-pytorch (peer/ours time), Soft MoE, {PHASE_LABEL[phase]}"
        if "soft_moe_pytorch" in samples:
            ratios.append(
                timing_ratio(
                    rid,
                    "peers",
                    metric,
                    samples["soft_moe_pytorch"],
                    samples["visionmoe"],
                    ">=",
                    SOFT_TARGET,
                    note=f"{cfg.soft_experts} experts x {cfg.soft_slots} slot(s), F={cfg.hidden}",
                )
            )
        else:
            ratios.append(
                ratio_record(
                    rid,
                    "peers",
                    metric,
                    None,
                    ">=",
                    SOFT_TARGET,
                    error=errors.get("soft_moe_pytorch", "not run"),
                )
            )
    return {"results": results, "ratios": ratios, "errors": errors}


def _run_token_choice(
    cfg: BenchConfig, group: int, suffix: str, errors: dict, results: dict, ratios: list
) -> None:
    """Ours vs the token-choice peers, one routing group per input row of ``cfg``'s shape."""
    slots, peer_cf = peer_capacity_factor(cfg)
    torch.manual_seed(cfg.seed)
    x = make_input(cfg)
    ours = make_moe(
        cfg,
        TOP_K,
        CAPACITY_FACTOR,
        group_size=cfg.tokens_per_image,
        eval_capacity_factor=CAPACITY_FACTOR,
    )
    tc = {"visionmoe": phase_fns(ours, x, _ours_loss)}
    for name in TOKEN_CHOICE_PEERS:
        fns = _try_peer(name, cfg, x, errors)
        if fns is not None:
            tc[name] = fns
    for phase in PHASES:
        samples = compare({k: v[phase] for k, v in tc.items()}, cfg.repeats, cfg.warmup)
        results[f"token_choice{suffix}.{phase}"] = {
            "experts": cfg.experts,
            "top_k": TOP_K,
            "capacity_factor": CAPACITY_FACTOR,
            "group_images": group,
            "slots_per_expert_per_group": slots,
            "peer_capacity_factor": peer_cf,
            "group_tokens": cfg.tokens_per_image,
            "times_s": {k: summarize(s) for k, s in samples.items()},
        }
        setting = (
            f"E={cfg.experts} top-{TOP_K} cf {CAPACITY_FACTOR}: {slots} slots/expert per "
            f"{cfg.tokens_per_image}-token group of {group} image(s) (peer cf {peer_cf:.3f})"
        )
        ratios.extend(_token_choice_ratios(phase, samples, errors, setting, suffix, group))


def _token_choice_ratios(
    phase: str, samples: dict, errors: dict, setting: str, suffix: str = "", group: int = 1
) -> list[dict]:
    """Speedup over the fastest token-choice peer (the target) and over each peer (info)."""
    peers = [p for p in TOKEN_CHOICE_PEERS if p in samples]
    where = f"groups of {group} image{'s' if group > 1 else ''}"
    metric = (
        f"Speedup over fastest token-choice peer (peer/ours time), {PHASE_LABEL[phase]}, {where}"
    )
    rid = f"peers.token_choice{suffix}.{phase}"
    if not peers:
        why = "; ".join(f"{k}: {v}" for k, v in errors.items()) or "no peer ran"
        return [ratio_record(rid, "peers", metric, None, ">=", TOKEN_CHOICE_TARGET, error=why)]
    fastest = min(peers, key=lambda p: summarize(samples[p])["median"])
    out = [
        timing_ratio(
            rid,
            "peers",
            metric,
            samples[fastest],
            samples["visionmoe"],
            ">=",
            TOKEN_CHOICE_TARGET,
            note=f"fastest peer: {fastest}; {setting}",
        )
    ]
    for peer in peers:
        out.append(
            timing_ratio(
                f"peers.{peer}{suffix}.{phase}",
                "peers",
                f"Speedup over {peer} (peer/ours time), {PHASE_LABEL[phase]}, {where}",
                samples[peer],
                samples["visionmoe"],
                None,
                None,
            )
        )
    for peer in TOKEN_CHOICE_PEERS:
        if peer not in samples:
            out.append(
                ratio_record(
                    f"peers.{peer}{suffix}.{phase}",
                    "peers",
                    f"Speedup over {peer} (peer/ours time), {PHASE_LABEL[phase]}, {where}",
                    None,
                    None,
                    None,
                    error=errors.get(peer, "not run"),
                )
            )
    return out
