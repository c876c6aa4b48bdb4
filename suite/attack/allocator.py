"""Keep large freed CPU buffers in the heap instead of handing them back to the OS.

An attack iteration allocates and frees tens of MB of parameter-sized gradient buffers (the
first backward, the matching loss and its backward). glibc serves blocks above its mmap
threshold with fresh ``mmap`` pages and unmaps them on free, and trims the heap top back to the
OS, so every iteration page-faults those buffers in again: measured on the CIFAR-stem ResNet18,
about 16,000 minor faults per attack iteration against none per training step, and element-wise
ops on 512x512x3x3 tensors taking 10-25 ms instead of about 1 ms (see docs/benchmarks.md).
Raising the mmap and trim thresholds once per process removes that; the process keeps its peak
heap instead of returning it between iterations.

Set ``GISTRESS_MALLOC_TUNING=0`` to leave glibc's defaults alone (the benchmark does this for
its A/B column). Any ``MALLOC_*_`` variable the user set wins too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# mmap threshold: glibc's own ceiling for the dynamic threshold on 64-bit (32 MiB)
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2**30

_state: dict[str, bool] = {}


def tune_allocator() -> bool:
    """Raise glibc's mmap/trim thresholds once per process; True when the tuning is active.

    A no-op (False) off Linux/glibc, when ``GISTRESS_MALLOC_TUNING=0``, or when the user set
    ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` themselves.
    """
    if "done" in _state:
        return _state["done"]
    _state["done"] = _apply()
    return _state["done"]


def _apply() -> bool:
    if os.environ.get("GISTRESS_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
