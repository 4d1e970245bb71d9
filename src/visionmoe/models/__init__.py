"""Vision Transformer family with MoE layers placed by block index."""

from visionmoe.models.config import MoEConfig, ViTConfig, dense_twin
from visionmoe.models.registry import (
    create_model,
    get_config,
    list_models,
    register_model,
)
from visionmoe.models.routing_control import set_routing
from visionmoe.models.variants import every_n, last_n, last_n_contiguous
from visionmoe.models.vit import ModelAux, VisionTransformer

__all__ = [
    "ModelAux",
    "MoEConfig",
    "ViTConfig",
    "VisionTransformer",
    "create_model",
    "dense_twin",
    "every_n",
    "get_config",
    "last_n",
    "last_n_contiguous",
    "list_models",
    "register_model",
    "set_routing",
]
