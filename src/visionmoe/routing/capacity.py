"""Expert buffer sizes (capacity) for sparse routers.

V-MoE sizes every expert's buffer per routing group as ``K * S * cf / E`` slots. The paper rounds
to the nearest integer; the released vmoe code takes the ceiling and then rounds up to a multiple
of 4 (friendlier to accelerators). Parity with the released checkpoints needs the latter, so it is
the default. Arithmetic is done in the same order as vmoe (``(S * K) * cf / E``) so float
rounding agrees with it too.
"""

from __future__ import annotations

import math

ROUNDINGS = ("ceil", "round")


def compute_capacity(
    num_tokens: int,
    num_experts: int,
    top_k: int = 1,
    capacity_factor: float = 1.0,
    rounding: str = "ceil",
    multiple_of: int | None = 4,
) -> int:
    """Slots per expert for a group of ``num_tokens`` tokens.

    Args:
      num_tokens: tokens in the routing group (S).
      num_experts: experts in the layer (E).
      top_k: experts picked per token (K); use 1 for Expert Choice, whose formula has no K.
      capacity_factor: cf > 0; 1.0 means a perfectly balanced router fills every buffer exactly.
      rounding: ``"ceil"`` (vmoe code) or ``"round"`` (paper; halves round up).
      multiple_of: round the result up to a multiple of this (vmoe uses 4), or ``None``.

    Raises:
      ValueError: on non-positive sizes, an unknown rounding, or a capacity below 1.
    """
    for name, value in (("num_tokens", num_tokens), ("num_experts", num_experts), ("top_k", top_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(capacity_factor, (int, float)) or not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be a number > 0, got {capacity_factor!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if multiple_of is not None and (not isinstance(multiple_of, int) or multiple_of < 1):
        raise ValueError(f"multiple_of must be a positive integer or None, got {multiple_of!r}")
    raw = num_tokens * top_k * capacity_factor / num_experts
    capacity = math.ceil(raw) if rounding == "ceil" else math.floor(raw + 0.5)
    if multiple_of is not None and capacity % multiple_of:
        capacity += multiple_of - capacity % multiple_of
    if capacity < 1:
        raise ValueError(
            f"capacity {capacity} < 1 for num_tokens={num_tokens}, num_experts={num_experts}, "
            f"top_k={top_k}, capacity_factor={capacity_factor}, rounding={rounding!r}; "
            "raise capacity_factor or use rounding='ceil'"
        )
    return capacity
