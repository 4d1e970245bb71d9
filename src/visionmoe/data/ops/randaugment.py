"""RandAugment on one uint8 ``(H, W, C)`` image, as the V-MoE ImageNet recipes apply it.

Each of ``num_layers`` layers draws one of the 16 ops in :data:`OPS` uniformly (with replacement)
and always applies it at the fixed magnitude ``M`` (``level = M / 10``, not clipped, so M > 10
extrapolates); PIPELINE.md section 2.6. There is no identity op and no per-op probability.

Two places where the reference does something other than the named operation; the named one is
the default and the reference behaviour is an option:

- ``solarize_wraps``: the reference threshold ``int(256 * level)`` wraps modulo 256 on its way to
  uint8, so at M=10 and M=20 Solarize inverts every pixel (threshold 0). By default the threshold
  is used as is (at M=10 it is 256: nothing is solarized).
- ``contrast_pixel_count``: the reference Contrast blends toward ``min(H * W / 256, 255)`` (the
  pixel count over 256, 196 at 224 px) instead of the mean grey. By default it blends toward the
  image's mean grey level (rounded), as the classic Contrast enhancement does.

All arithmetic is vectorised uint8/int32/float32 torch; geometric ops map every output pixel to a
source pixel (nearest, rounding half away from zero) and paint pixels from outside gray (128).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

__all__ = [
    "OPS",
    "RandAugment",
    "apply_op",
    "auto_contrast",
    "blend",
    "equalize",
    "randaugment",
    "sample_layers",
]

OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Cutout",
    "SolarizeAdd",
)
FILL = 128
# tf.image.rgb_to_grayscale weights.
GREY_WEIGHTS = (0.2989, 0.5870, 0.1140)


@dataclass(kw_only=True, frozen=True)
class RandAugment:
    """RandAugment(num_layers, magnitude) with the reference's quirks as opt-in options.

    V-MoE presets: light1 (2, 10), medium (2, 15), strong (2, 20), extreme (4, 15) / (4, 20).
    See the module docstring for ``solarize_wraps`` and ``contrast_pixel_count``.
    """

    num_layers: int = 2
    magnitude: float = 10.0
    solarize_wraps: bool = False
    contrast_pixel_count: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.num_layers, int) or self.num_layers < 0:
            raise ValueError(
                f"RandAugment.num_layers must be an integer >= 0, got {self.num_layers!r}"
            )
        if not (isinstance(self.magnitude, int | float) and 0 <= self.magnitude <= 30):
            raise ValueError(f"RandAugment.magnitude must be in [0, 30], got {self.magnitude!r}")


@dataclass(frozen=True)
class Layer:
    """One drawn layer: the op, the sign of signed ops, and a Cutout centre in [0, 1)^2."""

    op: str
    negate: bool
    centre: tuple[float, float]


def sample_layers(config: RandAugment, generator: torch.Generator) -> list[Layer]:
    """Draw the layers: 4 uniforms per layer (op, sign, Cutout row, Cutout column)."""
    draws = torch.rand((config.num_layers, 4), generator=generator, dtype=torch.float64).tolist()
    return [
        Layer(OPS[min(int(u_op * len(OPS)), len(OPS) - 1)], u_sign < 0.5, (u_y, u_x))
        for u_op, u_sign, u_y, u_x in draws
    ]


def randaugment(
    image: torch.Tensor, generator: torch.Generator, config: RandAugment
) -> torch.Tensor:
    """Apply ``config.num_layers`` randomly drawn ops to a uint8 ``(H, W, C)`` image."""
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(
            f"randaugment expects a uint8 (H, W, C) image with C in {{1, 3}}, "
            f"got {image.dtype} {tuple(image.shape)}"
        )
    for layer in sample_layers(config, generator):
        image = apply_op(image, layer, config)
    return image


def apply_op(image: torch.Tensor, layer: Layer, config: RandAugment) -> torch.Tensor:
    """One RandAugment op at ``config.magnitude`` (arguments per PIPELINE.md 2.6)."""
    level = config.magnitude / 10.0
    sign = -1.0 if layer.negate else 1.0
    op = layer.op
    if op == "AutoContrast":
        return auto_contrast(image)
    if op == "Equalize":
        return equalize(image)
    levels = torch.arange(256, dtype=torch.int32)
    if op == "Invert":
        return apply_lut(image, 255 - levels)
    if op == "Posterize":
        shift = 8 - int(4 * level)
        return apply_lut(image, levels * 0 if shift >= 8 else (levels >> shift) << shift)
    if op == "Solarize":
        threshold = int(256 * level)
        if config.solarize_wraps:
            threshold %= 256
        return apply_lut(image, torch.where(levels < threshold, levels, 255 - levels))
    if op == "SolarizeAdd":
        added = (levels + int(110 * level)).clamp(0, 255)
        return apply_lut(image, torch.where(levels < 128, added, levels))
    if op in ("Color", "Contrast", "Brightness", "Sharpness"):
        factor = 1.8 * level + 0.1
        degenerate = _degenerate(image, op, config)
        if degenerate.ndim == 0:  # a constant: the blend is a lookup table
            return apply_lut(image, blend(degenerate, levels.to(torch.uint8), factor))
        return blend(degenerate, image, factor)
    if op == "Cutout":
        return cutout(image, int(40 * level), layer.centre)
    height, width = image.shape[0], image.shape[1]
    ys, xs = _grid(height, width)
    if op == "Rotate":
        theta = math.radians(sign * 30.0 * level)
        cy, cx = (height - 1) / 2, (width - 1) / 2
        cos, sin = math.cos(theta), math.sin(theta)
        src_x = cos * (xs - cx) - sin * (ys - cy) + cx
        src_y = sin * (xs - cx) + cos * (ys - cy) + cy
    elif op == "ShearX":
        src_x, src_y = xs + (sign * 0.3 * level) * ys, ys
    elif op == "ShearY":
        src_x, src_y = xs, ys + (sign * 0.3 * level) * xs
    elif op in ("TranslateX", "TranslateY"):
        shift = sign * 100.0 * level
        if shift == int(shift):
            return translate(image, int(shift), axis=1 if op == "TranslateX" else 0)
        src_x, src_y = (xs + shift, ys) if op == "TranslateX" else (xs, ys + shift)
    else:
        raise ValueError(f"unknown RandAugment op {op!r}; known: {', '.join(OPS)}")
    return warp_nearest(image, src_y, src_x)


@lru_cache(maxsize=8)
def _grid(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    ys = torch.arange(height, dtype=torch.float64).view(-1, 1).expand(height, width)
    xs = torch.arange(width, dtype=torch.float64).view(1, -1).expand(height, width)
    return ys, xs


def _nearest(v: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest index (rounding half away from zero) of source coordinates, and which are inside.

    ``floor(v + 0.5)`` is that rounding for ``v > -0.5``; ``v = -0.5`` rounds to -1 (outside)
    and anything below is outside either way, so ``inside = -0.5 < v < size - 0.5``.
    """
    inside = (v > -0.5) & (v < size - 0.5)
    return (v + 0.5).floor_().to(torch.int64), inside


def warp_nearest(image: torch.Tensor, src_y: torch.Tensor, src_x: torch.Tensor) -> torch.Tensor:
    """``out[y, x] = image[round(src_y), round(src_x)]``, gray where the source is outside."""
    height, width, channels = image.shape
    yi, inside_y = _nearest(src_y, height)
    xi, inside_x = _nearest(src_x, width)
    # Outside pixels read one extra gray row appended after the image: a single gather.
    flat = torch.where(inside_y & inside_x, yi * width + xi, height * width).reshape(-1)
    gray = torch.full((1, channels), FILL, dtype=torch.uint8)
    padded = torch.cat([image.reshape(-1, channels), gray])
    return padded.index_select(0, flat).reshape(height, width, channels)


def translate(image: torch.Tensor, shift: int, axis: int) -> torch.Tensor:
    """``out[i] = image[i + shift]`` along ``axis`` (an integer shift), gray from outside."""
    size = image.shape[axis]
    out = torch.full_like(image, FILL)
    if abs(shift) >= size:
        return out
    src = image.narrow(axis, max(shift, 0), size - abs(shift))
    out.narrow(axis, max(-shift, 0), size - abs(shift)).copy_(src)
    return out


def apply_lut(image: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """``out = lut[image]`` with one 256-entry table (or one per channel: ``(C, 256)``)."""
    table = lut.to(torch.uint8).numpy()
    if table.ndim == 1:
        return torch.from_numpy(np.take(table, image.numpy()))
    pixels = image.numpy()
    out = np.empty_like(pixels)
    for c in range(pixels.shape[2]):
        np.take(table[c], pixels[..., c], out=out[..., c])
    return torch.from_numpy(out)


def cutout(image: torch.Tensor, half: int, centre: tuple[float, float]) -> torch.Tensor:
    """Gray square of side ``2 * half`` centred at a uniform pixel, clipped at the borders."""
    height, width = image.shape[0], image.shape[1]
    cy, cx = int(centre[0] * height), int(centre[1] * width)
    out = image.clone()
    out[max(0, cy - half) : min(height, cy + half), max(0, cx - half) : min(width, cx + half)] = (
        FILL
    )
    return out


def grey(image: torch.Tensor) -> torch.Tensor:
    """Luma rounded to uint8 levels, float32 ``(H, W, 1)``; a 1-channel image is its own grey."""
    x = image.to(torch.float32)
    if image.shape[2] == 1:
        return x
    r, g, b = GREY_WEIGHTS
    return (x[..., 0:1] * r + x[..., 1:2] * g + x[..., 2:3] * b + 0.5).floor_()


def _degenerate(image: torch.Tensor, op: str, config: RandAugment) -> torch.Tensor:
    """The image each enhance op blends away from (factor 0 would return it)."""
    if op == "Color":
        return grey(image)
    if op == "Brightness":
        return torch.zeros((), dtype=torch.float32)
    if op == "Contrast":
        height, width = image.shape[0], image.shape[1]
        if config.contrast_pixel_count:
            return torch.tensor(float(int(min(height * width / 256.0, 255.0))))
        return torch.floor(grey(image).mean(dtype=torch.float64) + 0.5).to(torch.float32)
    return smooth(image)


def smooth(image: torch.Tensor) -> torch.Tensor:
    """3x3 kernel [[1,1,1],[1,5,1],[1,1,1]]/13 on the interior, truncated to uint8 levels.

    The one-pixel border keeps the original values. Returned as float32.
    """
    x = image.to(torch.float32)
    height, width = image.shape[0], image.shape[1]
    if height < 3 or width < 3:
        return x
    total = 4.0 * x[1:-1, 1:-1]
    for dy in range(3):
        for dx in range(3):
            total.add_(x[dy : height - 2 + dy, dx : width - 2 + dx])
    out = x.clone()
    out[1:-1, 1:-1] = (total / 13.0).clamp_(0, 255).floor_()
    return out


def blend(degenerate: torch.Tensor, image: torch.Tensor, factor: float) -> torch.Tensor:
    """``a + factor * (b - a)`` in float32, clipped to [0, 255] and truncated to uint8."""
    x = image.to(torch.float32)  # a fresh tensor: updated in place
    return x.sub_(degenerate).mul_(factor).add_(degenerate).clamp_(0, 255).to(torch.uint8)


def auto_contrast(image: torch.Tensor) -> torch.Tensor:
    """Per channel, stretch [lo, hi] to [0, 255] (``floor((x - lo) * 255 / (hi - lo))``)."""
    flat = image.reshape(-1, image.shape[2])
    lo = flat.amin(dim=0).to(torch.int32).view(-1, 1)
    hi = flat.amax(dim=0).to(torch.int32).view(-1, 1)
    levels = torch.arange(256, dtype=torch.int32).expand(image.shape[2], 256)
    stretched = torch.div(
        (levels - lo).clamp(min=0) * 255, (hi - lo).clamp(min=1), rounding_mode="floor"
    )
    return apply_lut(image, torch.where(hi > lo, stretched.clamp(max=255), levels))


def equalize(image: torch.Tensor) -> torch.Tensor:
    """Per-channel histogram equalisation with the classic (PIL) step rule; see the spec 2.6."""
    luts = []
    for c in range(image.shape[2]):
        hist = torch.bincount(image[..., c].reshape(-1).to(torch.int64), minlength=256)
        last = int(hist.nonzero()[-1])
        step = (int(hist.sum()) - int(hist[last])) // 255
        levels = torch.arange(256)
        if step == 0:
            luts.append(levels)
            continue
        before = torch.cumsum(hist, 0) - hist  # pixels strictly below each level
        luts.append(torch.div(before + step // 2, step, rounding_mode="floor").clamp_(0, 255))
    return apply_lut(image, torch.stack(luts))
