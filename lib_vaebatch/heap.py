"""The process heap on the CPU: freed memory kept for reuse during a call, or handed back to the OS.

Two opposite needs, both about glibc's allocator (torch's CPU tensors come from ``malloc``):

* **Speed (whole-sample calls).** glibc serves blocks above its mmap threshold (at most 32 MiB)
  from fresh ``mmap`` regions and unmaps them when freed, and it trims the heap's top once more than
  the trim threshold is free. A VAE decode allocates and frees activations of 32–512 MiB dozens of
  times per call, so every one of them is new memory: the kernel faults in and zeroes every page
  again. :func:`reuse_freed` keeps freed blocks in the heap for the length of one call (no mmap, no
  trim), so later activations land on pages that are already mapped; afterwards the allocator's
  settings are restored and ``malloc_trim(0)`` hands the free pages back. The computation is the
  same (outputs bit for bit); measured in one process, alternated, on a 2-core Intel Xeon: a 256²
  decode 15% faster, 512² 10%, 256² batch 4 12% (docs/benchmarks.md). The cost is fragmentation
  inside the call. torch asks for 64-byte aligned blocks, and glibc's ``memalign`` leaves a small
  remainder beside each one; while those sit in the thread cache (seven per size) they keep freed
  neighbours from merging, so the first freed blocks of a size are holes the next one does not
  fit. The call's peak resident set ran 1.1–1.5× the plain call's, so the engine uses the reuse
  only where twice the chunk's planned memory fits the budget (:data:`REUSE_SLACK`); the holes go
  back to the OS when the call ends. On a thread other than the main one (a webui's worker, an
  HTTP server's pool), glibc's arena is made of 64 MiB heaps and serves larger blocks from mmap
  whatever the setting: there only the blocks under 64 MiB are reused (measured: 16 MiB blocks
  faulted in 6 times outside the scope and not at all inside; 64 MiB blocks 6 times in both).
* **Bounded memory (tiled runs).** A tiled run frees many blocks of many sizes (the slabs and
  temporaries of tiles of different crops); the freed ones that no later block fits stay resident,
  and the process's peak RSS then runs above the live tensors the planner counts
  (docs/benchmarks.md, lean-cpu-1024-b: fast within 1.25 GiB peaked at 1.47 GiB; at 512² the peak
  matched the plan to 0.1% once freed blocks were returned). :func:`release_freed` (``malloc_trim``)
  between steps gives the free pages back, without changing the allocator's settings. Returned
  pages fault in again when the next tile lands on them, so a planned tiled run trims only when
  the next tile could take it past its plan (:class:`HeapGuard`: the resident set now plus the
  largest rise seen between two tiles). Measured at 1024², recomputation within 1 GiB, one run
  each: trimming after every tile 86-94 s, never trimming 65 s but 14% over the plan.

``VAEBATCH_MALLOC_TRIM=0`` turns the trimming off, ``VAEBATCH_HEAP_REUSE=0`` the reuse. Both do
nothing elsewhere than glibc (musl, macOS, Windows), and the reuse stays off where the process's
allocator is someone else's choice: another ``malloc`` preloaded (A1111's ``webui.sh`` preloads
tcmalloc, which caches freed memory itself), or a user's own value for one of the settings the
reuse changes and then restores to fixed values (mmap threshold, mmap max, trim threshold: the
``MALLOC_MMAP_THRESHOLD_``/``MALLOC_MMAP_MAX_``/``MALLOC_TRIM_THRESHOLD_`` variables or their
``GLIBC_TUNABLES`` names), which the scope would overwrite. glibc's other settings (arenas, top
pad, tcache, perturb, check) are neither changed nor restored, so the reuse stays on under them;
``MALLOC_ARENA_MAX`` even widens it: threads then share the main arena, whose large blocks the
reuse covers (measured: six 64 MiB blocks on a worker thread faulted 98,310 pages in outside the
scope and none inside with ``MALLOC_ARENA_MAX=1`` or ``2``, 98,310 inside without it).

Restoring: glibc has no call to read its settings back, and any ``mallopt`` freezes its dynamic
thresholds. They are restored to where glibc's own adjustment takes a process that has freed a
tensor of 32 MiB or more (every process that has run a VAE): mmap threshold 32 MiB, trim threshold
64 MiB, mmap allowed.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
import threading
from collections.abc import Callable, Iterator

import torch

TRIM_ENV = "VAEBATCH_MALLOC_TRIM"
REUSE_ENV = "VAEBATCH_HEAP_REUSE"
#: A chunk runs with :func:`reuse_freed` only where this many times its planned memory fits the
#: budget: the heap's fragmentation within a call, measured up to 1.5× the plain call's peak.
REUSE_SLACK = 2.0

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
# where glibc's dynamic thresholds settle once a block of DEFAULT_MMAP_THRESHOLD_MAX was freed
_RESTORE = ((_M_MMAP_MAX, 65536), (_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 64 << 20))
_NEVER_TRIM = (1 << 31) - 1  # mallopt takes an int; 2 GiB of free top before glibc trims on its own

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

_lock = threading.Lock()
_depth = 0


def _off(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() in ("0", "false", "no", "off")


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the process's own C library
    except OSError:
        return None
    if getattr(libc, "gnu_get_libc_version", None) is None:  # musl has malloc_trim/mallopt stubs
        return None
    return libc


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    libc = _libc()
    fn = getattr(libc, "malloc_trim", None) if libc is not None else None
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


@functools.cache
def _mallopt() -> Callable[[int, int], int] | None:
    libc = _libc()
    fn = getattr(libc, "mallopt", None) if libc is not None else None
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


def enabled() -> bool:
    """Whether :func:`release_freed` trims (``VAEBATCH_MALLOC_TRIM``)."""
    return not _off(TRIM_ENV)


#: The settings :func:`reuse_freed` changes and restores, as glibc reads them from the environment
#: (mallopt(3)) and from ``GLIBC_TUNABLES`` (``name=value`` pairs joined by ``:``).
_OUR_SETTINGS = {
    "MALLOC_MMAP_MAX_": "glibc.malloc.mmap_max",
    "MALLOC_MMAP_THRESHOLD_": "glibc.malloc.mmap_threshold",
    "MALLOC_TRIM_THRESHOLD_": "glibc.malloc.trim_threshold",
}


def foreign_allocator() -> str | None:
    """Why the allocator is not ours to tune, or None: a preloaded malloc, or a user's value for
    a setting :func:`reuse_freed` would overwrite (see the module doc)."""
    preload = os.environ.get("LD_PRELOAD", "")
    for name in ("tcmalloc", "jemalloc", "mimalloc", "hoard"):
        if name in preload:
            return f"{name} is preloaded"
    tunables = {pair.partition("=")[0].strip() for pair in os.environ.get("GLIBC_TUNABLES", "").split(":")}
    for variable, tunable in _OUR_SETTINGS.items():
        if variable in os.environ:
            return f"{variable} is set"
        if tunable in tunables:
            return f"GLIBC_TUNABLES sets {tunable}"
    return None


def reuse_available() -> bool:
    """Whether :func:`reuse_freed` can act in this process."""
    return not _off(REUSE_ENV) and _mallopt() is not None and foreign_allocator() is None


def resident_bytes() -> int | None:
    """The process's resident set now (Linux ``/proc/self/statm``), or None where unknown."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def release_freed(device: torch.device) -> bool:
    """Return the heap's free pages to the OS after a step of a CPU run; whether it did."""
    if device.type != "cpu" or not enabled():
        return False
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True


class HeapGuard:
    """Keeps a tiled CPU run's resident set within ``limit`` bytes (absolute: where the run began
    plus its planned peak) while trimming as little as it can. Trimmed pages fault in again when
    the next tile lands on them, so freed pages stay for reuse as long as the largest rise seen
    between two checks (one tile's work) still fits under the limit; past that, they go back."""

    def __init__(self, limit: int, transient: int = 0) -> None:
        self.limit = limit
        #: the largest rise of the resident set between two checks so far; at least ``transient``,
        #: the planned temporaries of one tile's step (allocated and freed between two checks,
        #: so the resident set at the checks does not show them)
        self.rise = transient
        self.last: int | None = None
        self.trims = 0

    @classmethod
    def starting_now(cls, planned: int, transient: int = 0) -> HeapGuard | None:
        """A guard for a run that may rise ``planned`` bytes above the resident set now (None
        where the resident set cannot be read)."""
        now = resident_bytes()
        return None if now is None else cls(now + planned, transient)

    def check(self, device: torch.device) -> bool:
        """After a tile or step: trim if the next one could pass the limit; whether it did."""
        now = resident_bytes()
        if now is None or device.type != "cpu":
            return False
        if self.last is not None:
            self.rise = max(self.rise, now - self.last)
        did = now + self.rise > self.limit and release_freed(device)
        if did:
            self.trims += 1
            now = resident_bytes() or now
        self.last = now
        return did


@contextlib.contextmanager
def reuse_freed(device: torch.device | None) -> Iterator[bool]:
    """For the block: memory freed on the CPU stays in the heap for the next allocation (yields
    whether that is in effect; never for another device, or None). Nested and concurrent uses
    share one setting; the last one out restores the allocator and returns the free pages to the
    OS."""
    global _depth
    if device is None or device.type != "cpu" or not reuse_available():
        yield False
        return
    mallopt = _mallopt()
    assert mallopt is not None
    with _lock:
        if _depth == 0:
            mallopt(_M_MMAP_MAX, 0)
            mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)
        _depth += 1
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for param, value in _RESTORE:
                    mallopt(param, value)
                trim = _malloc_trim()
                if trim is not None:
                    trim(0)
