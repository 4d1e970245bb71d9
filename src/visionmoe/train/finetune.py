"""Starting a model from trained weights (V-MoE transfer recipe).

As vmoe fine-tunes: when the class count differs the head is re-created with a zero kernel and
bias ``-ln C`` (C classes; ``model.head_bias_init`` wins when set), and when the image size or
patch grid differs, learned position embeddings are resized bilinearly with aligned corners on
the patch grid, the class token kept.
"""

from __future__ import annotations

import math

import torch

from visionmoe.layers.patch_embed import resize_pos_embed
from visionmoe.models.vit import VisionTransformer

HEAD_KEYS = ("head.weight", "head.bias")


def reset_head(model: VisionTransformer) -> float:
    """Re-create the classifier as vmoe does for a new label set; returns the bias used.

    Zero kernel and bias ``-ln C``: every logit starts at ``-ln C``, so under vmoe's sigmoid
    cross-entropy each class starts near probability ``1/C``.
    """
    classes = model.config.num_classes
    configured = model.config.head_bias_init
    bias = -math.log(classes) if configured is None else float(configured)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(bias)
    return bias


def load_init_weights(model: VisionTransformer, state: dict[str, torch.Tensor]) -> list[str]:
    """Copy ``state`` into ``model`` where it fits; returns notes on what was adapted."""
    notes = []
    own = model.state_dict()
    state = dict(state)
    head_shape = tuple(state["head.weight"].shape) if "head.weight" in state else None
    if head_shape is not None and head_shape != tuple(own.get("head.weight", torch.empty(0)).shape):
        for key in HEAD_KEYS:
            state.pop(key, None)
        if "head.weight" in own:
            bias = reset_head(model)
            notes.append(
                f"new zero-initialised head ({head_shape[0]} -> {model.config.num_classes} "
                f"classes, bias {bias:.4f})"
            )
        else:
            notes.append(f"dropped the {head_shape[0]}-class head (the model has none)")
    if (
        "pos_embed" in state
        and "pos_embed" in own
        and state["pos_embed"].shape != own["pos_embed"].shape
    ):
        state["pos_embed"] = resize_pos_embed(
            state["pos_embed"], model.num_prefix, model.patch_embed.grid_size
        )
        notes.append(f"position embedding resized to a {model.patch_embed.grid_size}^2 grid")
    missing = sorted(set(own) - set(state) - set(HEAD_KEYS))
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or mismatched:
        raise ValueError(
            f"initial weights do not fit the model: missing {missing[:5]}, shape mismatch "
            f"{mismatched[:5]}; the architecture (other than head and image size) must match"
        )
    unexpected = sorted(set(state) - set(own))
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    if unexpected:
        notes.append(f"ignored {len(unexpected)} unexpected keys, e.g. {unexpected[:3]}")
    return notes
