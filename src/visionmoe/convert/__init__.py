"""Weight converters: released V-MoE checkpoints and dense ViTs from timm / HF / big_vision.

- :func:`read_vmoe_checkpoint` / :func:`write_vmoe_checkpoint`: vmoe's sharded msgpack format.
- :func:`convert_vmoe_tree` / :func:`load_vmoe`: vmoe parameter tree -> our model
  (:data:`VMOE_PRESETS` name the released checkpoints' routing settings).
- :func:`load_dense_vit`: timm, Hugging Face ``ViTForImageClassification`` or big_vision weights.
"""

from visionmoe.convert.cli import convert_dense_cli, convert_vmoe_cli
from visionmoe.convert.dense_vit import detect_format, load_dense_vit, read_weights
from visionmoe.convert.presets import VMOE_PRESETS, VmoePreset, get_preset
from visionmoe.convert.report import ConversionReport
from visionmoe.convert.vmoe_format import (
    VmoeFormatError,
    read_vmoe_checkpoint,
    write_vmoe_checkpoint,
)
from visionmoe.convert.vmoe_params import convert_vmoe_tree, infer_vmoe_config, load_vmoe

__all__ = [
    "VMOE_PRESETS",
    "ConversionReport",
    "VmoeFormatError",
    "VmoePreset",
    "convert_dense_cli",
    "convert_vmoe_cli",
    "convert_vmoe_tree",
    "detect_format",
    "get_preset",
    "infer_vmoe_config",
    "load_dense_vit",
    "load_vmoe",
    "read_vmoe_checkpoint",
    "read_weights",
    "write_vmoe_checkpoint",
]
