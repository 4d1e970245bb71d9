"""visionmoe: sparse Vision Mixture-of-Experts (V-MoE, BPR, Expert Choice, Soft MoE) in PyTorch."""

from visionmoe.models import (
    ModelAux,
    MoEConfig,
    VisionTransformer,
    ViTConfig,
    create_model,
    get_config,
    list_models,
    set_routing,
)

__version__ = "0.1.0"

__all__ = [
    "ModelAux",
    "MoEConfig",
    "ViTConfig",
    "VisionTransformer",
    "create_model",
    "get_config",
    "list_models",
    "set_routing",
]
