"""Opening models: one function for every source a command or a user may hand the library.

``load_model(source, **overrides)`` returns the model and a :class:`ModelInfo` (source kind,
architecture, training config if any, class names, evaluation preprocessing). It sits above
``models/``, ``convert/``, ``hub`` and the storage modules of ``train/`` (config, checkpoint,
finetune), and below ``eval/``, ``train/run.py``, ``upcycle`` and the CLI, which all open models
through it.
"""

from visionmoe.loading.record import (
    PREPROCESS_PIPELINES,
    SOURCE_KINDS,
    EvalPreprocess,
    LoadedModel,
    ModelInfo,
)
from visionmoe.loading.sources import (
    ACCEPTED_SOURCES,
    SourceError,
    build_model,
    detect_source,
    load_model,
    load_state,
    source_experiment,
)

__all__ = [
    "ACCEPTED_SOURCES",
    "PREPROCESS_PIPELINES",
    "SOURCE_KINDS",
    "EvalPreprocess",
    "LoadedModel",
    "ModelInfo",
    "SourceError",
    "build_model",
    "detect_source",
    "load_model",
    "load_state",
    "source_experiment",
]
