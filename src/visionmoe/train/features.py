"""Placing a model for training: device, TF32, activation checkpointing, ``torch.compile``."""

from __future__ import annotations

import torch
from torch import nn

from visionmoe.runtime import configure_backends, resolve_device
from visionmoe.train.config import ExperimentConfig

# The torch.compile backend ``train.compile`` uses; tests swap in a faster one.
COMPILE_BACKEND = "inductor"


def set_remat(model: nn.Module, enabled: bool = True) -> int:
    """Turn per-block activation checkpointing on or off; returns the number of blocks changed.

    Every :class:`visionmoe.models.vit.Block` then keeps only its input in the forward pass and
    recomputes attention and FFN activations in the backward pass (router noise and dropout
    replay the same draws). Models that do not run their blocks through ``Block.forward``
    (LIMoE) have none to change.
    """
    from visionmoe.models.vit import Block, VisionTransformer

    if not isinstance(model, VisionTransformer):
        return 0
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        block.remat = enabled
    return len(blocks)


def prepare_model(model: nn.Module, config: ExperimentConfig) -> tuple[nn.Module, torch.device]:
    """Move ``model`` to ``train.device``, set TF32 on CUDA, apply ``remat`` and ``compile``.

    ``compile`` compiles the module in place (``nn.Module.compile``), so parameter names and
    checkpoints are unchanged. Returns the model and its device.
    """
    device = resolve_device(config.train.device)
    configure_backends(device)
    model.to(device)
    if config.train.remat and not set_remat(model):
        raise ValueError(
            "train.remat=true needs a ViT model (image classification); this model has no "
            "blocks to checkpoint"
        )
    if config.train.compile:
        model.compile(backend=COMPILE_BACKEND)
    return model, device


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host batch to ``device``; to CUDA through pinned memory, without waiting."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
