"""The tiny LIMoE encoder the LIMoE tests share: 8x8 one-channel images in 2x2 patches, width 16,
2 blocks, 4 experts (top-1) in block 1."""

from dataclasses import replace

from visionmoe.models.config import MoEConfig, ViTConfig


def tiny_limoe_config(**moe) -> ViTConfig:
    """The config, with ``moe`` overriding the MoE defaults (cf 1.0, one group, BPR on)."""
    moe_config = MoEConfig(
        num_experts=4, top_k=1, capacity_factor=1.0, group_images=None, batch_priority=True
    )
    return ViTConfig(
        image_size=8,
        patch_size=2,
        in_chans=1,
        num_classes=0,
        hidden_size=16,
        mlp_dim=32,
        num_heads=2,
        num_layers=2,
        moe=replace(moe_config, **moe),
        moe_layers=(1,),
    )
