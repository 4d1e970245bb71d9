"""Mixup of a batch with soft targets, paired within contiguous chunks as vmoe does.

The batch ``(N, ...)`` is split into ``N / chunk_size`` contiguous chunks (vmoe: one chunk per
device). Each chunk draws mixing weights ``alpha ~ Dirichlet([c] * size)`` sorted descending and
mixes ``x'_j = sum_i alpha_i * x_{(j + i) mod n}`` inside the chunk, and the targets with the same
weights; with ``size=2`` that is ``lambda = max(l, 1 - l)``, ``l ~ Beta(c, c)``, paired with the
next image (PIPELINE.md 2.7). ``granularity="batch"`` draws one weight vector for every chunk,
``"example"`` one per image. Mixed one-hot targets still sum to 1 per row, so they suit both the
sigmoid (V-MoE pre-training) and the softmax cross-entropy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["GRANULARITIES", "MIXUP_STREAM", "Mixup", "mixup", "mixup_for_step", "mixup_weights"]

GRANULARITIES = ("device", "batch", "example")


@dataclass(kw_only=True, frozen=True)
class Mixup:
    """Mixup settings; ``concentration=0`` disables it (the V-MoE fine-tuning configs).

    ``chunk_size=None`` makes the whole (per-rank) batch one chunk, vmoe's per-device pairing.
    """

    concentration: float = 0.0
    size: int = 2
    granularity: str = "device"
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        if not self.concentration >= 0:
            raise ValueError(f"Mixup.concentration must be >= 0, got {self.concentration!r}")
        if not isinstance(self.size, int) or self.size < 2:
            raise ValueError(f"Mixup.size must be an integer >= 2, got {self.size!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"Mixup.granularity must be one of {GRANULARITIES}, got {self.granularity!r}"
            )
        if self.chunk_size is not None and (
            not isinstance(self.chunk_size, int) or self.chunk_size <= 0
        ):
            raise ValueError(
                f"Mixup.chunk_size must be a positive integer or None, got {self.chunk_size!r}"
            )

    @property
    def enabled(self) -> bool:
        return self.concentration > 0


def mixup_weights(count: int, config: Mixup, generator: torch.Generator) -> np.ndarray:
    """``(count, size)`` Dirichlet weights, each row sorted descending (float64)."""
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet([config.concentration] * config.size, size=count)
    return -np.sort(-weights, axis=1)


def mixup(
    images: torch.Tensor,
    targets: torch.Tensor,
    config: Mixup,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix ``images (N, ...)`` float and ``targets (N, C)`` float with the same weights.

    Returns new tensors; with mixup disabled the inputs are returned unchanged.
    """
    if not config.enabled:
        return images, targets
    n = images.shape[0]
    if targets.shape[0] != n or targets.ndim != 2:
        raise ValueError(
            f"mixup needs (N, C) float targets for N={n} images, got {tuple(targets.shape)}"
        )
    chunk = n if config.chunk_size is None else config.chunk_size
    if n % chunk:
        raise ValueError(f"batch size {n} is not a multiple of Mixup.chunk_size={chunk}")
    chunks = n // chunk
    count = {"device": chunks, "batch": 1, "example": n}[config.granularity]
    weights = torch.from_numpy(mixup_weights(count, config, generator)).to(torch.float32)
    # One weight row per image: (N, size).
    if config.granularity == "example":
        per_image = weights
    else:
        per_image = weights.repeat_interleave(n // count, dim=0)
    per_image = per_image.to(images.device)
    x = images.reshape(chunks, chunk, *images.shape[1:])
    y = targets.reshape(chunks, chunk, -1)
    w = per_image.reshape(chunks, chunk, config.size)
    mixed_x = torch.zeros_like(x)
    mixed_y = torch.zeros_like(y)
    for i in range(config.size):
        # x_{(j + i) mod n} inside each chunk is a roll by -i along the chunk axis.
        wi = w[:, :, i]
        mixed_x += wi.reshape(*wi.shape, *([1] * (x.ndim - 2))) * torch.roll(x, -i, dims=1)
        mixed_y += wi.unsqueeze(-1) * torch.roll(y, -i, dims=1)
    return mixed_x.reshape(images.shape), mixed_y.reshape(targets.shape)


MIXUP_STREAM = 2**31 + 1  # the random-stream tag of mixup draws; per-sample draws never use it


def mixup_for_step(
    images: torch.Tensor,
    labels: torch.Tensor,
    positions: torch.Tensor,
    config: Mixup,
    *,
    seed: int,
    step: int,
    num_classes: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One rank's batch at ``step``: labels to one-hot, then :func:`mixup`, reproducibly.

    Each chunk's weights come from a generator keyed by ``(seed, step, MIXUP_STREAM, p)``, ``p``
    the global batch position of the chunk's first image (``granularity="batch"``: no ``p``,
    one draw shared by every rank). With ``chunk_size`` set and each rank's share a multiple of
    it, the mix is the same whatever the number of ranks; with ``chunk_size=None`` each rank's
    share is one chunk, as vmoe pairs within each device's batch.
    """
    targets = torch.nn.functional.one_hot(labels, num_classes).to(images.dtype)
    if not config.enabled:
        return images, targets
    if config.granularity == "batch":
        key = (seed, step, MIXUP_STREAM)
        return mixup(images, targets, config, _generator(key))
    chunk = len(images) if config.chunk_size is None else config.chunk_size
    if len(images) % chunk:
        raise ValueError(
            f"this rank's batch of {len(images)} images is not a multiple of "
            f"preprocess.mixup_chunk_size={chunk}"
        )
    whole = Mixup(
        concentration=config.concentration, size=config.size, granularity=config.granularity
    )
    xs, ys = [], []
    for start in range(0, len(images), chunk):
        key = (seed, step, MIXUP_STREAM, int(positions[start]))
        x, y = mixup(
            images[start : start + chunk], targets[start : start + chunk], whole, _generator(key)
        )
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def _generator(key: tuple[int, ...]) -> torch.Generator:
    seed = int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(seed)
