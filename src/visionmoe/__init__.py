"""visionmoe: sparse Vision Mixture-of-Experts (V-MoE, BPR, Expert Choice, Soft MoE) in PyTorch.

Entry points: :func:`load_model` (open a run, checkpoint, pretrained folder or vmoe
checkpoint), :func:`create_model` / :func:`list_models` (model family), :func:`set_routing`
(inference-time capacity, BPR, top-k), :func:`run_training` and the run-level evaluators, each
the Python twin of a ``visionmoe`` command.
"""

from visionmoe.eval.classify import evaluate_run, predict_files
from visionmoe.eval.fewshot_run import fewshot_run
from visionmoe.eval.inspect import inspect_run
from visionmoe.eval.sweep import sweep_run
from visionmoe.hub import from_pretrained, save_pretrained
from visionmoe.loading import EvalPreprocess, ModelInfo, load_model
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
from visionmoe.train.run import load_run, run_training
from visionmoe.upcycle import upcycle
from visionmoe.version import __version__ as __version__

__all__ = [
    "EvalPreprocess",
    "ModelAux",
    "ModelInfo",
    "MoEConfig",
    "ViTConfig",
    "VisionTransformer",
    "create_model",
    "evaluate_run",
    "fewshot_run",
    "from_pretrained",
    "get_config",
    "inspect_run",
    "list_models",
    "load_model",
    "load_run",
    "predict_files",
    "run_training",
    "save_pretrained",
    "set_routing",
    "sweep_run",
    "upcycle",
]
