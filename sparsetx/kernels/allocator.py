"""The C heap (glibc malloc) under inference: what sparsetx asks of it, through ctypes.

glibc hands freed blocks above its mmap threshold straight back to the OS and trims a free heap
top beyond its trim threshold, so a forward that frees and reallocates activations of a few MB
pays page faults (a zeroed 4 KiB page each) on every call: measured on a 1:8 MiniLM at 512
tokens, 1 thread, 146-163 ms a forward, 116-121 ms with the thresholds below (128 tokens: no
difference beyond noise; 1 GiB thresholds: 140-149 ms). Elsewhere than glibc both are no-ops.
"""
from __future__ import annotations

import ctypes
import os
from functools import lru_cache

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 64 << 20                      # blocks below this come from the heap and are reused
TRIM_THRESHOLD = 128 << 20                     # free heap kept before it is returned to the OS


@lru_cache(maxsize=1)
def _libc():
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def trim_heap() -> None:
    """Return the heap's free memory to the OS now (glibc ``malloc_trim``)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@lru_cache(maxsize=1)
def tune_allocator() -> bool:
    """Keep freed activation-sized blocks in the process for reuse (fixed mmap and trim
    thresholds, once a process). ``SPARSETX_MALLOC=default`` leaves glibc as it is. Returns
    whether the thresholds were set."""
    libc = _libc()
    if libc is None or os.environ.get("SPARSETX_MALLOC", "") == "default":
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
