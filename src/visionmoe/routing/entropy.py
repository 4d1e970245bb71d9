"""LIMoE entropy auxiliary losses (arXiv 2206.02770), computed per modality.

Shape legend: T tokens (of one routing group, both modalities mixed), E experts.

Each function takes the router probabilities ``probs_TE`` (softmax of the *clean* logits, with
gradient; which logits the paper used is unverified) and a boolean ``mask_T`` selecting the
tokens of one modality. Why per modality: the classic importance / load losses on a mixed pool
can be satisfied while the minority modality (text) collapses onto one expert or is dropped;
separate terms per modality prevent that. All maths in float32. A modality with no token in the
group contributes 0 (and a zero gradient), so a text-only or image-only forward still works.
"""

from __future__ import annotations

import torch
from torch import Tensor

_TINY = 1e-20  # keeps log() finite at p = 0, where p * log(p) -> 0 anyway


def entropy(probs_XE: Tensor) -> Tensor:
    """``Ent(q) = -sum_e q_e log q_e`` over the last axis (natural log, nats)."""
    probs_XE = probs_XE.float()
    return -(probs_XE * probs_XE.clamp_min(_TINY).log()).sum(dim=-1)


def _select(probs_TE: Tensor, mask_T: Tensor) -> Tensor:
    if mask_T.shape != probs_TE.shape[:1] or mask_T.dtype != torch.bool:
        raise ValueError(
            f"mask_T must be a bool tensor of shape ({probs_TE.shape[0]},), got "
            f"{mask_T.dtype} {tuple(mask_T.shape)}"
        )
    return probs_TE.float()[mask_T]


def local_entropy_loss(probs_TE: Tensor, mask_T: Tensor) -> Tensor:
    """Mean per-token router entropy of one modality; minimising it makes routing confident.

    ``Omega_local(m) = (1 / n_m) * sum_{x in X_m} Ent(p(.|x))``
    """
    probs_NE = _select(probs_TE, mask_T)
    if probs_NE.shape[0] == 0:
        return probs_TE.float().sum() * 0.0
    return entropy(probs_NE).mean()


def global_entropy_loss(probs_TE: Tensor, mask_T: Tensor, threshold: float | None = None) -> Tensor:
    """Negative entropy of one modality's marginal expert usage; minimising it spreads usage.

    ``p_bar_m = (1 / n_m) * sum_{x in X_m} p(.|x)``
    ``threshold=None``:   ``Omega_global(m)   = -Ent(p_bar_m)``            (unthresholded)
    ``threshold=tau``:    ``Omega^tau_global(m) = max(0, tau - Ent(p_bar_m))``

    With ``tau = log(S)`` the thresholded loss is 0 once the modality effectively uses at least
    S experts (a soft minimum; the paper's motivation is text, which should use several but not
    all experts). ``tau = 0`` is *not* the unthresholded loss: ``max(0, -Ent)`` is always 0,
    hence ``None`` for the plain ``-Ent``. Entropy is at most ``log(E)``, so ``tau >= log(E)``
    never switches off.
    """
    if threshold is not None and (isinstance(threshold, bool) or not threshold >= 0):
        raise ValueError(f"threshold must be a number >= 0 or None, got {threshold!r}")
    probs_NE = _select(probs_TE, mask_T)
    if probs_NE.shape[0] == 0:
        return probs_TE.float().sum() * 0.0
    marginal = entropy(probs_NE.mean(dim=0))
    if threshold is None:
        return -marginal
    return torch.relu(threshold - marginal)
