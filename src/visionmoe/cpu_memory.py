"""Keep freed CPU memory in the process, so large tensors of every step reuse mapped pages.

glibc serves allocations above its mmap threshold (at most 32 MiB) with fresh ``mmap`` calls and
hands them back to the kernel on ``free``. A training step allocates the same large tensors every
time: weight gradients, bf16 copies of the expert weights (an E=32 V-MoE-S layer's ``w1`` is 75
MB in float32), their casts. Each new mapping is zero-filled page by page on first touch, and
those page faults cost more than the arithmetic around them (measured: 161 ms -> 91 ms for one
E=32 bf16 MoE layer forward+backward on 2 cores). :func:`keep_freed_memory` switches glibc to
serve every size from its heap and never trim it, so the pages of one step are reused by the
next, as a caching allocator does on GPUs. The cost: the process keeps its peak heap size.

It is applied once per process by :func:`visionmoe.runtime.configure_backends` for CPU devices
(every command, ``visionmoe.train``, the benchmarks). Set ``VISIONMOE_CPU_ALLOCATOR=system`` to
leave glibc's defaults alone. Without glibc (macOS, Windows, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

ENV_VAR = "VISIONMOE_CPU_ALLOCATOR"
CHOICES = ("keep", "system")
# glibc <malloc.h> parameter numbers for mallopt().
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_NEVER = 2**31 - 1  # mallopt takes an int; about 2 GiB of free heap top before trimming

_applied: bool | None = None


def allocator_choice() -> str:
    """The value of ``VISIONMOE_CPU_ALLOCATOR`` (default ``keep``); a bad value is an error."""
    value = os.environ.get(ENV_VAR, "keep").strip().lower() or "keep"
    if value not in CHOICES:
        raise ValueError(f"{ENV_VAR} must be one of {CHOICES}, got {value!r}")
    return value


def _libc_mallopt():
    if os.name != "posix":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    gnu_version = getattr(libc, "gnu_get_libc_version", None)
    mallopt = getattr(libc, "mallopt", None)
    if gnu_version is None or mallopt is None:  # not glibc: other mallocs read other knobs
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt


def keeping_freed_memory() -> bool:
    """Whether :func:`keep_freed_memory` is in effect in this process (reads, changes nothing)."""
    return bool(_applied)


def keep_freed_memory() -> bool:
    """Make glibc reuse freed memory instead of unmapping it; once per process.

    Returns whether the setting is active (False without glibc or with
    ``VISIONMOE_CPU_ALLOCATOR=system``).
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if allocator_choice() == "system":
        return False
    mallopt = _libc_mallopt()
    if mallopt is None:
        return False
    # mallopt returns 1 on success, 0 on error.
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_NEVER))
    return _applied
