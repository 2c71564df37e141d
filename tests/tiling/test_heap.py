"""Freed heap memory goes back to the OS between tiled steps (glibc's ``malloc_trim``), measured
in a child process by its resident set, not by the call's return value."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: Interleaved ~1 MB tensors from the heap (a freed 16 MB block first raises glibc's mmap
#: threshold, as a tiled run's first large frees do), every other one freed: free chunks in the
#: middle of the heap, which glibc keeps resident.
CHILD = r"""
import json
import torch
from lib_vaebatch.tiling.heap import release_freed

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

big = torch.ones(4 << 20)
del big
kept, freed = [], []
for i in range(200):
    (kept if i % 2 else freed).append(torch.ones((1 << 18) + 1000 * i))
del freed
before = rss()
did = release_freed(torch.device("cpu"))
after = rss()
print(json.dumps({"did": did, "released_mib": (before - after) / 2**20, "kept": len(kept)}))
"""


def _run(**env: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim and /proc are Linux's")
def test_freed_tiles_memory_is_returned_to_the_os_unless_turned_off():
    on = _run()
    assert on["did"] is True
    assert on["released_mib"] > 50, on  # about 100 MiB freed in the middle of the heap
    off = _run(VAEBATCH_MALLOC_TRIM="0")
    assert off["did"] is False
    assert off["released_mib"] < 10, off
