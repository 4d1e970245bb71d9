"""Model sizes and MoE placements as data.

Sizes are ``(num_layers, hidden_size, mlp_dim, num_heads)``. V-MoE's "S" is 8 layers of width
512, not the 12-layer DeiT-S used by the standard ViT tables.
"""

from __future__ import annotations

VIT_SIZES: dict[str, tuple[int, int, int, int]] = {
    "Ti": (12, 192, 768, 3),
    "S": (12, 384, 1536, 6),
    "B": (12, 768, 3072, 12),
    "L": (24, 1024, 4096, 16),
    "H": (32, 1280, 5120, 16),
    "debug": (4, 32, 64, 2),
}

VMOE_SIZES: dict[str, tuple[int, int, int, int]] = {
    **VIT_SIZES,
    "S": (8, 512, 2048, 8),
}


def size_kwargs(size: str, table: dict[str, tuple[int, int, int, int]] = VIT_SIZES) -> dict:
    layers, width, mlp, heads = table[size]
    return {"num_layers": layers, "hidden_size": width, "mlp_dim": mlp, "num_heads": heads}


def every_n(num_layers: int, n: int) -> tuple[int, ...]:
    """V-MoE "Every-n": blocks ``n-1, 2n-1, ...`` (Every-2 = the odd blocks)."""
    return tuple(range(n - 1, num_layers, n))


def last_n(num_layers: int, n: int) -> tuple[int, ...]:
    """V-MoE "Last-n": the last n *odd* blocks (12 blocks, Last-2 -> (9, 11))."""
    return tuple(range(1, num_layers, 2))[-n:]


def last_n_contiguous(num_layers: int, n: int) -> tuple[int, ...]:
    """Soft MoE / Expert Choice "last n": the last n blocks (12 blocks, n=6 -> 6..11)."""
    return tuple(range(num_layers - n, num_layers))
