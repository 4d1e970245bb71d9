"""Where and in what precision models run: device choice, bf16 autocast, TF32, peak memory.

Every command and API function that runs a model takes ``device`` (``None`` or ``"auto"``: CUDA
when available, else CPU) and ``precision`` (``"fp32"`` or ``"bf16"``). ``bf16`` runs the forward
under ``torch.autocast(dtype=torch.bfloat16)``; parameters, gradients and optimizer state stay
float32, and the routers switch autocast off and compute logits, gates and combine weights in
float32 (see ``visionmoe.routing.base`` and ``visionmoe.routing.soft``), so routing decisions do
not depend on bf16 rounding. On CUDA, float32 matmuls and convolutions use TF32.
"""

from __future__ import annotations

import contextlib
import resource
import sys

import torch

from visionmoe.cpu_memory import keep_freed_memory

PRECISIONS = ("fp32", "bf16")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` / ``"auto"``: ``cuda`` when available, else ``cpu``; else the named device.

    A CUDA device asked for on a machine without one is an error, not a silent fall-back.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}"
        ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return resolved


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``precision="bf16"``, else a no-op context."""
    if check_precision(precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def configure_backends(device: torch.device) -> None:
    """TF32 for float32 matmuls and cuDNN convolutions on CUDA; on CPU, freed memory is kept
    for reuse (:func:`visionmoe.cpu_memory.keep_freed_memory`)."""
    if device.type == "cpu":
        keep_freed_memory()
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 tensor cores for float32 matmuls
        torch.backends.cudnn.allow_tf32 = True


def place_model(model: torch.nn.Module, device: str | torch.device | None = None):
    """Move ``model`` to ``device`` (resolved as :func:`resolve_device`) with TF32 on CUDA;
    returns ``(model, device)``."""
    resolved = resolve_device(device)
    configure_backends(resolved)
    return model.to(resolved), resolved


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: allocated tensor memory on CUDA, the process's peak RSS on CPU.

    Neither reading waits for the device.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
