import os
import subprocess
import sys

import pytest

from visionmoe import cpu_memory

PROBE = """
import ctypes, ctypes.util, sys
from visionmoe import cpu_memory
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
if not hasattr(libc, "gnu_get_libc_version"):
    print("no-glibc"); sys.exit(0)
print(cpu_memory.keep_freed_memory(), cpu_memory.keeping_freed_memory())
# A freed 80 MB block comes back from the heap, at the same address, instead of a new mapping.
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
a = libc.malloc(80 << 20)
libc.free(a)
b = libc.malloc(80 << 20)
small = libc.malloc(64)  # always from the heap (brk), far below the mmap area
print(a == b, "heap" if abs(a - small) < 2**32 else "mmap")
"""


def _probe(env_value: str | None) -> list[str]:
    env = dict(os.environ)
    env.pop(cpu_memory.ENV_VAR, None)
    if env_value is not None:
        env[cpu_memory.ENV_VAR] = env_value
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.split()


def test_keep_freed_memory_serves_large_blocks_from_the_heap():
    words = _probe(None)
    if words == ["no-glibc"]:
        pytest.skip("glibc only")
    assert words[:2] == ["True", "True"]  # applied, and reported as applied
    assert words[3] == "heap"


def test_system_choice_leaves_glibc_alone():
    words = _probe("system")
    if words == ["no-glibc"]:
        pytest.skip("glibc only")
    assert words[:2] == ["False", "False"]
    assert words[3] == "mmap"  # glibc's default: a block this large is its own mapping


def test_bad_choice_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(cpu_memory.ENV_VAR, "jemalloc")
    with pytest.raises(ValueError, match="VISIONMOE_CPU_ALLOCATOR must be one of .*'jemalloc'"):
        cpu_memory.allocator_choice()
