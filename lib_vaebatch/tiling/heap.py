"""Freed memory handed back to the operating system between the steps of a tiled CPU run.

glibc keeps freed blocks in the heap for reuse, and raises its mmap threshold after each large
free, so most tile-sized blocks come from the heap. A tiled run frees many blocks of many sizes
(the slabs and temporaries of tiles of different crops); the freed ones that no later block fits
stay resident, and the process's peak RSS then runs above the live tensors the planner counts
(docs/benchmarks.md, lean-cpu-1024-b: fast within 1.25 GiB peaked at 1.47 GiB; at 512² the
peak matched the plan to 0.1% once freed blocks were returned). ``malloc_trim(0)`` between steps
gives the free pages back (``madvise``), without changing the allocator's settings for the rest
of the process (a webui's, say).

``VAEBATCH_MALLOC_TRIM=0`` turns it off. Elsewhere than glibc (musl, macOS, Windows) it does
nothing.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Callable

import torch

TRIM_ENV = "VAEBATCH_MALLOC_TRIM"


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = getattr(ctypes.CDLL(None), "malloc_trim", None)  # the process's own C library
    except OSError:
        return None
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def enabled() -> bool:
    return os.environ.get(TRIM_ENV, "1").strip() not in ("0", "false", "no", "off")


def release_freed(device: torch.device) -> bool:
    """Return the heap's free pages to the OS after a step of a CPU run; whether it did."""
    if device.type != "cpu" or not enabled():
        return False
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True
