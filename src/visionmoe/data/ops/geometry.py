"""Decode, crops, resizes and flips on one HWC image (the V-MoE reference semantics).

Images are ``torch.Tensor`` of shape ``(H, W, C)``: uint8 straight from the decoder, float32 after
:func:`resize_small` (which, like the reference, does not requantise). Random ops take an explicit
``torch.Generator`` so a sample's preprocessing is a pure function of the generator's seed.
Geometry is done with PIL (decode, crop) and torch (resampling); see PIPELINE.md section 2.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from os import PathLike

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "Box",
    "central_crop",
    "decode",
    "decode_and_crop",
    "flip_lr",
    "image_size_of",
    "inception_crop",
    "resize",
    "resize_small",
    "sample_inception_box",
    "value_range",
]

Box = tuple[int, int, int, int]  # (top, left, height, width)
Encoded = bytes | str | PathLike
Size = int | tuple[int, int]


def _pair(size: Size, name: str) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and s > 0 for s in pair):
        raise ValueError(f"{name} must be a positive int or (height, width), got {size!r}")
    return pair  # type: ignore[return-value]


def _check_image(image: torch.Tensor) -> None:
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[2] not in (1, 3):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"expected an (H, W, C) image tensor with C in {{1, 3}}, got {shape}")


def _open(data: Encoded):
    from PIL import Image

    source = io.BytesIO(data) if isinstance(data, bytes | bytearray | memoryview) else data
    return Image.open(source)


def _to_tensor(pil_image) -> torch.Tensor:
    if pil_image.mode != "RGB":
        pil_image = pil_image.convert("RGB")
    return torch.from_numpy(np.array(pil_image, dtype=np.uint8))


def decode(data: Encoded) -> torch.Tensor:
    """Encoded image bytes (or a file path) -> uint8 ``(H, W, 3)`` RGB (``decode`` in the spec).

    The reference decodes JPEGs with libjpeg's fast integer DCT; PIL uses the accurate one, so
    pixel values may differ from the reference by 1-2 levels.
    """
    with _open(data) as pil_image:
        return _to_tensor(pil_image)


def image_size_of(data: Encoded) -> tuple[int, int]:
    """``(height, width)`` from the image header, without decoding the pixels."""
    with _open(data) as pil_image:
        width, height = pil_image.size
    return height, width


def decode_and_crop(data: Encoded, box: Box | Callable[[int, int], Box]) -> torch.Tensor:
    """Decode only ``box = (top, left, height, width)``, as uint8 ``(h, w, 3)``.

    ``box`` may be a function of the header's ``(height, width)`` returning the box, so a
    random crop is drawn and decoded with one open of the file.
    """
    with _open(data) as pil_image:
        width, height = pil_image.size
        top, left, h, w = box(height, width) if callable(box) else box
        return _to_tensor(pil_image.crop((left, top, left + w, top + h)))


def sample_inception_box(
    height: int,
    width: int,
    generator: torch.Generator,
    *,
    area_range: tuple[float, float] = (0.05, 1.0),
    aspect_range: tuple[float, float] = (0.75, 1.33),
    attempts: int = 100,
) -> Box:
    """A random crop box as TF's ``sample_distorted_bounding_box`` draws it (PIPELINE.md 2.2).

    Per attempt: aspect ``ar = w/h ~ U(aspect_range)`` (linear); the *integer height* is uniform
    between the heights giving the min and max area at that aspect (not area-uniform); the width is
    ``rint(h * ar)``; one +-1 height retry brings the area into range. Offsets are uniform over
    ``[0, H - h - 1]`` (the reference never puts a smaller crop flush with the bottom/right edge).
    If every attempt fails, the whole image is returned. ``rint`` rounds half to even.
    """
    lo_area, hi_area = area_range[0] * height * width, area_range[1] * height * width
    # Four uniforms per attempt; the first attempt usually succeeds, so draw it on its own.
    first = torch.rand((1, 4), generator=generator, dtype=torch.float64).tolist()
    for attempt in range(attempts):
        if attempt == 1:
            rest = torch.rand((attempts - 1, 4), generator=generator, dtype=torch.float64)
            rest = rest.tolist()
        u_aspect, u_height, u_top, u_left = first[0] if attempt == 0 else rest[attempt - 1]
        aspect = aspect_range[0] + (aspect_range[1] - aspect_range[0]) * u_aspect
        h_min = round(math.sqrt(lo_area / aspect))
        h_max = round(math.sqrt(hi_area / aspect))
        # The largest height whose rounded width still fits, then no taller than the image.
        while h_max > 0 and round(h_max * aspect) > width:
            h_max -= 1
        h_max = min(h_max, height)
        h_min = min(h_min, h_max)
        h = h_min + int(u_height * (h_max - h_min + 1))
        w = round(h * aspect)
        if w * h < lo_area:
            h += 1
            w = round(h * aspect)
        elif w * h > hi_area:
            h -= 1
            w = round(h * aspect)
        if not (lo_area <= w * h <= hi_area) or not (0 < h <= height and 0 < w <= width):
            continue
        top = int(u_top * (height - h)) if h < height else 0
        left = int(u_left * (width - w)) if w < width else 0
        return top, left, h, w
    return 0, 0, height, width


def inception_crop(
    image: torch.Tensor, size: Size, generator: torch.Generator, **box_options
) -> torch.Tensor:
    """Random inception-style crop of a decoded image, resized to ``size`` with :func:`resize`."""
    _check_image(image)
    top, left, h, w = sample_inception_box(image.shape[0], image.shape[1], generator, **box_options)
    return resize(image[top : top + h, left : left + w], size)


def resize(image: torch.Tensor, size: Size) -> torch.Tensor:
    """Bilinear resize with half-pixel centres and no antialiasing (TF2 ``tf.image.resize``).

    An int ``size`` gives a square output, so the aspect ratio is not kept. uint8 input is cast
    back to uint8 by truncation (floor), as the reference does; float input stays float32.
    """
    _check_image(image)
    out_h, out_w = _pair(size, "size")
    x = image.permute(2, 0, 1).unsqueeze(0).to(torch.float32)  # channels-last strides: fast path
    if (out_h, out_w) != tuple(image.shape[:2]):
        x = F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=False)
    x = x[0].permute(1, 2, 0)
    if image.dtype == torch.uint8:
        return x.floor_().to(torch.uint8).contiguous()
    return x.contiguous()


def _area_taps(n: int, out_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, weight)``, both ``(out_len, K)``: output i is ``sum_k weight[i, k] *
    input[index[i, k]]``, the exact average of the input over ``[i*s, (i+1)*s)``, s = n/out_len.

    Each output overlaps at most ``ceil(s) + 1`` input pixels; a pixel's weight is its overlap
    length / s (float64). Taps past the overlap get weight 0 and a clamped index.
    """
    scale = n / out_len
    edges = np.arange(out_len + 1, dtype=np.float64) * scale
    edges[-1] = n  # exact right edge despite rounding
    taps = int(math.ceil(scale)) + 1
    index = np.floor(edges[:-1]).astype(np.int64)[:, None] + np.arange(taps)[None, :]
    overlap = np.minimum(edges[1:, None], index + 1) - np.maximum(edges[:-1, None], index)
    weight = np.clip(overlap, 0.0, None) / scale
    return torch.from_numpy(np.minimum(index, n - 1)), torch.from_numpy(weight)


def _area_axis(x: torch.Tensor, out_len: int, dim: int) -> torch.Tensor:
    """Exact box averaging along ``dim`` of a float64 tensor (one gather per tap)."""
    index, weight = _area_taps(x.shape[dim], out_len)
    shape = [1] * x.ndim
    shape[dim] = out_len
    out = x.index_select(dim, index[:, 0]).mul_(weight[:, 0].view(shape))
    for k in range(1, index.shape[1]):
        out.add_(x.index_select(dim, index[:, k]).mul_(weight[:, k].view(shape)))
    return out


def resize_small(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize so the shorter side is ``size``, by exact area averaging; returns float32.

    The factor is ``size / min(H, W)`` in float32 and each side is rounded half to even, as the
    reference does. The output stays float32 like vmoe's (big_vision requantises to uint8).
    """
    _check_image(image)
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive int, got {size!r}")
    height, width = image.shape[0], image.shape[1]
    factor = np.float32(size) / np.float32(min(height, width))
    new_h = int(np.rint(np.float32(height) * factor))
    new_w = int(np.rint(np.float32(width) * factor))
    x = image.to(torch.float64)
    if new_h != height:
        x = _area_axis(x, new_h, 0)
    if new_w != width:
        x = _area_axis(x, new_w, 1)
    return x.to(torch.float32)


def central_crop(image: torch.Tensor, size: Size) -> torch.Tensor:
    """The centred ``size`` window; the top/left offsets round down: ``(H - h) // 2``."""
    _check_image(image)
    crop_h, crop_w = _pair(size, "size")
    height, width = image.shape[0], image.shape[1]
    if crop_h > height or crop_w > width:
        raise ValueError(
            f"central_crop size {(crop_h, crop_w)} is larger than the image {(height, width)}"
        )
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return image[top : top + crop_h, left : left + crop_w]


def flip_lr(image: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror left-right with probability ``p`` (one uniform draw from ``generator``)."""
    if float(torch.rand((), generator=generator)) < p:
        return image.flip(1)
    return image


def value_range(x: torch.Tensor, low: float = -1.0, high: float = 1.0) -> torch.Tensor:
    """Map [0, 255] linearly to ``[low, high]`` in float32, without clipping."""
    return x.to(torch.float32) * ((high - low) / 255.0) + low
