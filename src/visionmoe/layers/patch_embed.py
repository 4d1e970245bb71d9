"""Patch embedding and position embeddings."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PatchEmbed(nn.Module):
    """Non-overlapping ``P x P`` patches projected to D by a strided convolution."""

    def __init__(self, image_size: int, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(
                f"image_size={image_size} is not divisible by patch_size={patch_size}; "
                "choose a patch size that divides the image size"
            )
        self.image_size = image_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.grid_size = image_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        fan_in = in_chans * patch_size * patch_size
        nn.init.trunc_normal_(self.proj.weight, std=math.sqrt(1.0 / fan_in))
        nn.init.zeros_(self.proj.bias)

    def forward(self, x_BCHW: Tensor) -> Tensor:
        if not isinstance(x_BCHW, Tensor):
            raise TypeError(f"expected a torch.Tensor of images, got {type(x_BCHW).__name__}")
        expected = (self.in_chans, self.image_size, self.image_size)
        if x_BCHW.ndim != 4 or tuple(x_BCHW.shape[1:]) != expected:
            raise ValueError(
                f"expected images of shape (B, {', '.join(map(str, expected))}), got "
                f"{tuple(x_BCHW.shape)}"
            )
        return self.proj(x_BCHW).flatten(2).transpose(1, 2)


def sincos_2d(grid_size: int, dim: int, temperature: float = 10_000.0) -> Tensor:
    """Fixed 2-D sin-cos position embedding ``(grid_size**2, dim)``; ``dim`` divisible by 4."""
    if dim % 4:
        raise ValueError(f"sincos2d position embedding needs hidden size % 4 == 0, got {dim}")
    ys, xs = torch.meshgrid(
        torch.arange(grid_size, dtype=torch.float32),
        torch.arange(grid_size, dtype=torch.float32),
        indexing="ij",
    )
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4 - 1 or 1))
    y = ys.flatten()[:, None] * omega[None]
    x = xs.flatten()[:, None] * omega[None]
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)


def resize_pos_embed(
    pos_1ND: Tensor, num_prefix: int, new_grid: int, align_corners: bool = True
) -> Tensor:
    """Resize a learned position embedding to a new patch grid (bilinear); prefix tokens kept.

    ``align_corners=True`` (default) maps the corner patches of both grids onto each other, as
    vmoe and the original ViT code resize (a first-order zoom of the grid); ``False`` uses
    half-pixel centres instead. Interpolates in float64, returns the input dtype.
    """
    prefix, grid = pos_1ND[:, :num_prefix], pos_1ND[:, num_prefix:]
    old = math.isqrt(grid.shape[1])
    if old * old != grid.shape[1]:
        raise ValueError(f"position embedding has {grid.shape[1]} patch entries, not a square grid")
    if old == new_grid:
        return pos_1ND
    dim = grid.shape[-1]
    grid = grid.reshape(1, old, old, dim).permute(0, 3, 1, 2).double()
    grid = nn.functional.interpolate(
        grid, size=(new_grid, new_grid), mode="bilinear", align_corners=align_corners
    )
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(pos_1ND.dtype)
    return torch.cat([prefix, grid], dim=1)
