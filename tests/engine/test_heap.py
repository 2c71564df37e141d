"""Freed heap memory goes back to the OS between tiled steps (glibc's ``malloc_trim``), measured
in a child process by its resident set, not by the call's return value."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

#: Interleaved ~1 MB tensors from the heap (a freed 16 MB block first raises glibc's mmap
#: threshold, as a tiled run's first large frees do), every other one freed: free chunks in the
#: middle of the heap, which glibc keeps resident.
CHILD = r"""
import contextlib
import json
import torch
from lib_vaebatch.heap import HeapGuard

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
cpu = torch.device("cpu")
held = HeapGuard(before + (1 << 30)).check(cpu)  # a plan far above: freed pages kept for reuse
after_held = rss()
did = HeapGuard(before - (32 << 20)).check(cpu)  # past it: handed back
after = rss()
print(json.dumps({"did": did, "released_mib": (after_held - after) / 2**20, "kept": len(kept),
                  "held": held, "released_held_mib": (before - after_held) / 2**20}))
"""


def _run(**env: str) -> dict:
    return _run_child(CHILD, **env)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim and /proc are Linux's")
def test_freed_tiles_memory_is_returned_to_the_os_unless_turned_off():
    on = _run()
    assert on["held"] is False and on["released_held_mib"] < 10, on  # below the level: kept for reuse
    assert on["did"] is True
    assert on["released_mib"] > 50, on  # about 100 MiB freed in the middle of the heap
    off = _run(VAEBATCH_MALLOC_TRIM="0")
    assert off["did"] is False
    assert off["released_mib"] < 10, off


#: 64 MiB tensors allocated, written and freed in turn: without reuse each one is a fresh mmap
#: whose pages the kernel faults in again; with it, the same heap pages serve every one (once the
#: small remainders of torch's aligned allocations have filled glibc's tcache, after about ten
#: blocks: until then each freed block is a hole the next one does not fit, see heap.py).
REUSE_CHILD = r"""
import json, resource
import torch
from lib_vaebatch.heap import reuse_freed

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

def churn():
    before = faults()
    for _ in range(6):
        t = torch.empty(16 << 20)
        t.fill_(1.0)
        del t
    return faults() - before

cpu = torch.device("cpu")
churn()
out = {"before": churn()}
with reuse_freed(cpu) as on:
    with reuse_freed(cpu) as nested:
        pass
    churn(), churn(), churn()
    out["inside"] = churn()  # the nested scope's exit leaves the outer one's setting
    base = rss()
    big = torch.ones(64 << 20)  # 256 MiB, larger than any hole: from the heap's top, kept on free
    del big
    out["kept_inside_mib"] = (rss() - base) / 2**20
out.update(on=on, nested=nested)
out["kept_after_mib"] = (rss() - base) / 2**20  # the scope's end returned the free pages
big = torch.ones(64 << 20)  # mmapped again, and unmapped on free
del big
out["kept_big_after_mib"] = (rss() - base) / 2**20
with reuse_freed(None) as none:
    out["none"] = none
print(json.dumps(out))
"""

PAGES = (16 << 20) * 4 // 4096  # one 64 MiB tensor's pages


def _run_child(code: str, **env: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and /proc are Linux's")
def test_freed_memory_is_reused_within_the_scope_and_returned_after_it():
    env = dict.fromkeys(("LD_PRELOAD", "GLIBC_TUNABLES"), "")
    r = _run_child(REUSE_CHILD, **env)
    assert r["on"] is True and r["nested"] is True and r["none"] is False
    # six blocks, six times faulted in from fresh mmaps; inside, about once (the heap's pages)
    assert r["before"] > 5 * PAGES, r
    assert r["inside"] < 2 * PAGES, r
    # a freed 256 MiB block stays resident inside the scope; after it, the free pages went back
    # and the allocator maps (and unmaps) large blocks again
    assert r["kept_inside_mib"] > 128, r  # part of it may land on holes already resident
    assert r["kept_after_mib"] < 32, r
    assert r["kept_big_after_mib"] < 32, r


#: The same on a worker thread (a webui's generation runs on one): its glibc arena is made of
#: 64 MiB heaps, so there the reuse covers blocks under 64 MiB (16 MiB here).
THREAD_CHILD = r"""
import json, resource, threading
import torch
from lib_vaebatch.heap import reuse_freed

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt  # the main thread waits in join

def churn():
    before = faults()
    for _ in range(6):
        t = torch.empty(4 << 20)
        t.fill_(1.0)
        del t
    return faults() - before

result = {}
def work():
    churn()
    result["before"] = churn()
    with reuse_freed(torch.device("cpu")):
        churn(), churn(), churn()
        result["inside"] = churn()

t = threading.Thread(target=work)
t.start()
t.join()
print(json.dumps(result))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and /proc are Linux's")
def test_on_a_worker_thread_blocks_under_64_mib_are_reused():
    r = _run_child(THREAD_CHILD, LD_PRELOAD="", GLIBC_TUNABLES="")
    pages = PAGES // 4  # 16 MiB blocks
    assert r["before"] > 2 * pages, r  # outside the scope some are mapped afresh (4-6 of 6 seen)
    assert r["inside"] < 2 * pages, r


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and /proc are Linux's")
@pytest.mark.parametrize("env", [{"VAEBATCH_HEAP_REUSE": "0"}, {"MALLOC_ARENA_MAX_": "2"}])
def test_reuse_stays_off_when_turned_off_or_the_allocator_is_configured_by_the_user(env):
    r = _run_child(REUSE_CHILD, **env)
    assert r["on"] is False
    assert r["inside"] > 5 * PAGES, r


def test_foreign_allocators_are_left_alone(monkeypatch):
    from lib_vaebatch import heap

    for name in list(os.environ):
        if name.startswith("MALLOC_") or name in ("LD_PRELOAD", "GLIBC_TUNABLES"):
            monkeypatch.delenv(name)
    assert heap.foreign_allocator() is None
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
    assert heap.foreign_allocator() == "tcmalloc is preloaded"
    monkeypatch.setenv("LD_PRELOAD", "")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    assert "glibc.malloc" in heap.foreign_allocator()


def test_engine_reuses_the_heap_for_untiled_cpu_chunks_that_leave_room(monkeypatch, cpu_chunks_by_memory):
    """Untiled CPU chunks run in the reuse scope when twice their planned memory fits the budget;
    tiled ones and tight chunks do not; the outputs are the same bit for bit."""
    from lib_vaebatch.engine import runner
    from lib_vaebatch.engine.decode import decode_latents
    from lib_vaebatch.engine.options import EngineOptions
    from lib_vaebatch.engine.planner import estimate_bytes
    from lib_vaebatch.heap import reuse_available
    from tests.support import marked_latents, tiny_backend

    for name in list(os.environ):
        if name.startswith("MALLOC_") or name in ("LD_PRELOAD", "GLIBC_TUNABLES", "VAEBATCH_HEAP_REUSE"):
            monkeypatch.delenv(name)
    expected = sys.platform.startswith("linux")  # glibc here; elsewhere the scope does nothing
    assert reuse_available() is expected
    seen: list[bool] = []
    real = runner.reuse_freed

    @contextlib.contextmanager
    def spy(device):
        with real(device) as on:
            seen.append(on)
            yield on

    monkeypatch.setattr(runner, "reuse_freed", spy)
    vae = tiny_backend()
    latents = marked_latents(3)
    per = estimate_bytes(vae, "decode", 64 * 64, vae.dtype) + vae.fixed_bytes("decode")

    roomy = decode_latents(vae, latents, options=EngineOptions(max_chunk=3))
    assert seen == [expected]
    seen.clear()
    tight = decode_latents(vae, latents, options=EngineOptions(max_chunk=1, memory_budget=int(per * 1.5)))
    assert tight.chunk_sizes == [1, 1, 1] and seen == [False] * 3
    seen.clear()
    tiled = decode_latents(vae, latents, options=EngineOptions(tiling="always", tile_size=8))
    assert seen == [False] * 3
    assert all(t is not None for t in tight.outputs + tiled.outputs)
    # The same computation on reused pages: the module's outputs, bit for bit, in and out of it.
    z = latents / vae.scaling_factor
    with torch.no_grad():
        outside = vae.module.decode(z).sample
        with real(torch.device("cpu")) as on:
            inside = [vae.module.decode(z).sample for _ in range(3)]  # the later ones on reused pages
    assert on is expected
    assert all(torch.equal(outside, x) for x in inside)
    assert (torch.stack(roomy.outputs) - outside).abs().max() <= 1e-5
