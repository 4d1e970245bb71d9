"""Auxiliary load-balancing losses for routers, as small named functions.

Each function accepts ``(S, E)`` inputs (one group) and returns a scalar, or ``(G, S, E)`` inputs
and returns a ``(G,)`` vector (one value per routing group, averaged by the caller). All maths in
float32. Shape legend: G groups, S tokens per group, E experts.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cv_squared(v: Tensor, dim: int = -1) -> Tensor:
    """Squared coefficient of variation, ``(std(v) / mean(v))^2`` with the population std."""
    v = v.float()
    return v.var(dim=dim, unbiased=False) / v.mean(dim=dim).pow(2).clamp_min(1e-20)


def importance_loss(gates_SE: Tensor) -> Tensor:
    """V-MoE importance loss: ``CV^2(Imp)`` with ``Imp_e = sum_s gates[s, e]``.

    ``gates`` must be the softmax of the *clean* (noise-free) router logits.
    """
    importance_E = gates_SE.float().sum(dim=-2)
    return cv_squared(importance_E)


def load_loss(logits_SE: Tensor, noisy_logits_SE: Tensor, noise_std: float, top_k: int) -> Tensor:
    """V-MoE load loss: ``CV^2(Load)`` from a smooth estimate of each expert's load.

    ``thr_s`` is the K-th largest *noisy* logit of token s, taken over all experts (including e,
    which biases the estimate low for experts already in the top-K, as the reference does).
    ``P[s, e] = 1 - Phi((thr_s - l[s, e]) / sigma)`` is the chance that expert e clears the
    threshold when only its own noise is redrawn; ``Load_e = mean_s P[s, e]``. Gradients reach
    the router through both the clean logits and the threshold. ``noise_std`` is the sigma used.
    """
    if not noise_std > 0:
        raise ValueError(f"load_loss needs the noise std actually used (> 0), got {noise_std!r}")
    logits_SE = logits_SE.float()
    threshold_S1 = torch.topk(noisy_logits_SE.float(), top_k, dim=-1).values[..., -1:]
    prob_SE = 1.0 - torch.special.ndtr((threshold_S1 - logits_SE) / noise_std)
    load_E = prob_SE.mean(dim=-2)
    return cv_squared(load_E)


def gshard_loss(gates_SE: Tensor) -> Tensor:
    """GShard / Switch balance loss ``E^2 * mean_e(f_e * mean_gate_e)``.

    ``f_e`` is the fraction of tokens whose top-1 expert is e (no gradient), ``mean_gate_e``
    the mean gate (carries the gradient). Equals 1 for a perfectly uniform router.
    """
    gates_SE = gates_SE.float()
    num_experts = gates_SE.shape[-1]
    top1_SE = torch.nn.functional.one_hot(gates_SE.argmax(dim=-1), num_experts).float()
    fraction_E = top1_SE.mean(dim=-2)
    mean_gate_E = gates_SE.mean(dim=-2)
    return num_experts**2 * (fraction_E * mean_gate_E).mean(dim=-1)


def z_loss(logits_SE: Tensor) -> Tensor:
    """Router z-loss ``mean_s logsumexp(l_s)^2``: keeps router logits small (ST-MoE)."""
    return torch.logsumexp(logits_SE.float(), dim=-1).pow(2).mean(dim=-1)
