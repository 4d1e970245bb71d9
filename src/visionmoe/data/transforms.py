"""Batch-level conversion and augmentation, applied to uint8 batches on the fly.

Datasets stay uint8 on the host; only the current batch is expanded to float, which keeps memory
at a quarter of a pre-converted float dataset and lets the same arrays feed models of any input
size or channel count.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["augment", "to_model_input"]


def to_model_input(
    images_NHWC_uint8: np.ndarray | torch.Tensor, image_size: int, channels: int
) -> torch.Tensor:
    """Convert uint8 (N, H, W, C) images to float32 (N, channels, size, size) in [-1, 1].

    The [-1, 1] range (``x / 127.5 - 1``) matches the V-MoE reference pipeline, so pretrained
    weights and published hyper-parameters transfer.  Greyscale is repeated to RGB and RGB is
    averaged to grey so one model config can be run across datasets of either kind.  Resizing
    uses antialiased bilinear interpolation because downscaling without antialiasing aliases
    badly on fine textures.  A tensor input keeps its device, so batches can be moved to the GPU
    as uint8 (4x less transfer) and converted there.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if isinstance(images_NHWC_uint8, np.ndarray):
        array = images_NHWC_uint8
        if not array.flags.writeable:
            array = array.copy()  # torch.from_numpy warns about (and cannot honour) read-only data
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            x = torch.from_numpy(np.ascontiguousarray(array))
    elif isinstance(images_NHWC_uint8, torch.Tensor):
        x = images_NHWC_uint8
    else:
        raise TypeError(f"expected a numpy array or torch tensor, got {type(images_NHWC_uint8)}")
    # Refusing floats prevents silently normalising an already-normalised batch a second time.
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[3] not in (1, 3):
        raise ValueError(
            f"expected uint8 images of shape (N, H, W, C) with C in {{1, 3}}, "
            f"got {x.dtype} {tuple(x.shape)}"
        )
    x = x.permute(0, 3, 1, 2).float()
    # Reduce channels before resizing and expand after it, so interpolation runs on fewer planes.
    if channels == 1 and x.shape[1] == 3:
        x = x.mean(dim=1, keepdim=True)
    if x.shape[2] != image_size or x.shape[3] != image_size:
        x = F.interpolate(
            x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True
        )
    x = (x / 127.5 - 1.0).clamp_(-1.0, 1.0)
    if channels == 3 and x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous()


def augment(
    x_NCHW: torch.Tensor,
    generator: torch.Generator,
    crop_padding: int = 0,
    hflip: bool = False,
    *,
    pad_mode: str = "zero",
    positions: torch.Tensor | None = None,
    draw_size: int | None = None,
) -> torch.Tensor:
    """Random pad-and-crop plus random horizontal flip, independently per image.

    This is the standard CIFAR/MNIST-scale augmentation.  It is implemented as a single gather
    with per-image index grids instead of a Python loop, so its cost does not grow with the
    number of Python calls, and padding is never materialised: out-of-range indices are either
    clamped (``pad_mode="edge"``) or masked to 0 (``pad_mode="zero"``; 0 is mid-grey for model
    input in [-1, 1]).  All randomness comes from ``generator``, so a seeded generator gives
    identical batches on every run.  With nothing to do, ``x_NCHW`` is returned unchanged.

    When ``x_NCHW`` is part of a larger batch (one rank's share, or a batch that lost a corrupt
    image), ``draw_size`` is the size of the whole batch and ``positions (N,)`` the positions of
    these images in it: the draws are made for the whole batch and picked at ``positions``, so an
    image is augmented the same way whichever rank reads it.
    """
    if x_NCHW.ndim != 4:
        raise ValueError(f"expected an (N, C, H, W) tensor, got shape {tuple(x_NCHW.shape)}")
    if crop_padding < 0:
        raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
    if pad_mode not in ("zero", "edge"):
        raise ValueError(f"pad_mode must be 'zero' or 'edge', got {pad_mode!r}")
    if crop_padding == 0 and not hflip:
        return x_NCHW
    n, c, h, w = x_NCHW.shape
    device = x_NCHW.device
    p = crop_padding
    drawn = n if draw_size is None else draw_size
    if positions is None:
        if drawn != n:
            raise ValueError(f"draw_size {drawn} differs from the batch size {n}: give positions")
        pick = torch.arange(n)
    else:
        pick = positions.to("cpu", torch.long)
        if pick.shape != (n,) or (n and (pick.min() < 0 or pick.max() >= drawn)):
            raise ValueError(f"positions must have shape ({n},) and lie in [0, {drawn})")
    # Draw on the generator's own device (required by torch), then move the few numbers over.
    gen_device = generator.device
    if p > 0:
        offsets = torch.randint(0, 2 * p + 1, (drawn, 2), generator=generator, device=gen_device)
        offsets = offsets.cpu()[pick].to(device) - p
    else:
        offsets = torch.zeros((n, 2), dtype=torch.long, device=device)
    if hflip:
        flips = torch.randint(0, 2, (drawn,), generator=generator, device=gen_device)
        flips = flips.cpu()[pick].to(device)
    else:
        flips = torch.zeros((n,), dtype=torch.long, device=device)

    rows = offsets[:, :1] + torch.arange(h, device=device)  # (N, H) source row per output row
    base_cols = torch.arange(w, device=device).expand(n, w)
    base_cols = torch.where(flips[:, None].bool(), (w - 1) - base_cols, base_cols)
    # A flipped image reads its crop window right-to-left, so crop and flip fuse into one grid.
    cols = offsets[:, 1:] + base_cols  # (N, W)

    rows_c = rows.clamp(0, h - 1)
    cols_c = cols.clamp(0, w - 1)
    out = x_NCHW.gather(2, rows_c[:, None, :, None].expand(n, c, h, w))
    out = out.gather(3, cols_c[:, None, None, :].expand(n, c, h, w))
    if pad_mode == "zero" and p > 0:
        valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
        out = torch.where(valid[:, None], out, torch.zeros((), dtype=out.dtype, device=device))
    return out
