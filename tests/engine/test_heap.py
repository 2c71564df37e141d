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
#: 64 MiB heaps, so there the reuse covers blocks under 64 MiB (16 MiB here) unless threads share
#: the main arena (MALLOC_ARENA_MAX); 64 MiB blocks are reported too.
THREAD_CHILD = r"""
import json, resource, threading
import torch
from lib_vaebatch.heap import reuse_freed

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt  # the main thread waits in join

def churn(n=4 << 20):
    before = faults()
    for _ in range(6):
        t = torch.empty(n)
        t.fill_(1.0)
        del t
    return faults() - before

result = {}
def work():
    churn(), churn(16 << 20)
    result["before"], result["before_big"] = churn(), churn(16 << 20)
    with reuse_freed(torch.device("cpu")) as on:
        churn(), churn(), churn()
        result["inside"] = churn()
        churn(16 << 20), churn(16 << 20), churn(16 << 20)
        result["inside_big"] = churn(16 << 20)
    result["on"] = on

t = threading.Thread(target=work)
t.start()
t.join()
print(json.dumps(result))
"""

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc's mallopt and /proc are Linux's"
)


@linux_only
def test_on_a_worker_thread_blocks_under_64_mib_are_reused():
    r = _run_child(THREAD_CHILD, LD_PRELOAD="", GLIBC_TUNABLES="")
    pages = PAGES // 4  # 16 MiB blocks
    assert r["on"] is True
    assert r["before"] > 2 * pages, r  # outside the scope some are mapped afresh (4-6 of 6 seen)
    assert r["inside"] < 2 * pages, r
    assert r["inside_big"] > 5 * PAGES, r  # the thread's 64 MiB heaps: mmapped whatever the setting


@linux_only
@pytest.mark.parametrize(
    ("env", "shared"),
    [
        ({"MALLOC_ARENA_MAX": "2"}, False),
        ({"MALLOC_ARENA_MAX": "1"}, True),
        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1"}, True),
    ],
)
def test_settings_the_reuse_does_not_touch_leave_it_on_and_one_arena_widens_it(env, shared):
    """glibc's arena count is not a setting the scope changes or restores, so the reuse stays on
    under it; with one arena for every thread it covers a worker thread's 64 MiB blocks too. (With
    two, this thread gets the second arena, 64 MiB heaps; which thread gets which is glibc's.)"""
    r = _run_child(THREAD_CHILD, **{"LD_PRELOAD": "", "GLIBC_TUNABLES": "", **env})
    assert r["on"] is True, r
    assert r["inside"] < 2 * (PAGES // 4), r
    assert r["before_big"] > 5 * PAGES, r
    if shared:
        assert r["inside_big"] < 2 * PAGES, r


#: A user's own mmap threshold of 1 MiB: every 4 MiB block is mmapped afresh. After the reuse
#: scope (which must stay off), it still is: the scope did not reset the allocator to its values.
KEPT_CHILD = r"""
import json, resource
import torch
from lib_vaebatch.heap import reuse_freed

def churn(n):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(6):
        t = torch.empty(n)
        t.fill_(1.0)
        del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

churn(1 << 20)
with reuse_freed(torch.device("cpu")) as on:
    churn(16 << 20)
    inside = churn(16 << 20)
print(json.dumps({"on": on, "inside": inside, "after": churn(1 << 20)}))
"""


@linux_only
@pytest.mark.parametrize(
    "env",
    [
        {"VAEBATCH_HEAP_REUSE": "0"},
        {"MALLOC_MMAP_THRESHOLD_": "1048576"},
        {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576"},
        {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=1048576"},
    ],
)
def test_reuse_stays_off_when_turned_off_or_its_settings_are_the_users(env):
    r = _run_child(REUSE_CHILD, **{"LD_PRELOAD": "", "GLIBC_TUNABLES": "", **env})
    assert r["on"] is False
    assert r["inside"] > 5 * PAGES, r


@linux_only
@pytest.mark.parametrize(
    "env", [{"MALLOC_MMAP_THRESHOLD_": "1048576"}, {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576"}]
)
def test_a_users_allocator_settings_survive_the_reuse_scope(env):
    r = _run_child(KEPT_CHILD, **{"LD_PRELOAD": "", "GLIBC_TUNABLES": "", **env})
    assert r["on"] is False
    assert r["inside"] > 5 * PAGES, r
    assert r["after"] > 5 * (PAGES // 16), r  # six 4 MiB blocks, each mmapped: the user's 1 MiB holds


def test_foreign_allocators_are_left_alone(monkeypatch):
    from lib_vaebatch import heap

    for name in list(os.environ):
        if name.startswith("MALLOC_") or name in ("LD_PRELOAD", "GLIBC_TUNABLES"):
            monkeypatch.delenv(name)
    assert heap.foreign_allocator() is None
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
    assert heap.foreign_allocator() == "tcmalloc is preloaded"
    monkeypatch.setenv("LD_PRELOAD", "")
    for untouched in ("glibc.malloc.hugetlb=1", "glibc.malloc.arena_max=2:glibc.malloc.tcache_count=0"):
        monkeypatch.setenv("GLIBC_TUNABLES", untouched)
        assert heap.foreign_allocator() is None, untouched
    for name in ("mmap_threshold", "mmap_max", "trim_threshold"):
        monkeypatch.setenv("GLIBC_TUNABLES", f"glibc.malloc.arena_max=2:glibc.malloc.{name}=65536")
        assert heap.foreign_allocator() == f"GLIBC_TUNABLES sets glibc.malloc.{name}"
    monkeypatch.setenv("GLIBC_TUNABLES", "")
    for variable in ("MALLOC_ARENA_MAX", "MALLOC_ARENA_TEST", "MALLOC_TOP_PAD_", "MALLOC_PERTURB_"):
        monkeypatch.setenv(variable, "2")
        assert heap.foreign_allocator() is None, variable
    for variable in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.setenv(variable, "65536")
        assert heap.foreign_allocator() == f"{variable} is set"
        monkeypatch.delenv(variable)


@pytest.mark.parametrize(
    ("value", "on"),
    [("0", False), ("false", False), ("No", False), (" OFF ", False), ("FALSE", False), ("1", True),
     ("yes", True), ("", True)],
)  # fmt: skip
def test_the_switches_take_the_usual_words_for_off(monkeypatch, value, on):
    from lib_vaebatch import heap

    for name in list(os.environ):
        if name.startswith("MALLOC_") or name in ("LD_PRELOAD", "GLIBC_TUNABLES"):
            monkeypatch.delenv(name)
    glibc = heap._mallopt() is not None
    for name, reads in ((heap.TRIM_ENV, heap.enabled), (heap.REUSE_ENV, heap.reuse_available)):
        monkeypatch.delenv(name, raising=False)
        assert reads() is (glibc or name == heap.TRIM_ENV), "on unless turned off"
        monkeypatch.setenv(name, value)
        assert reads() is (on and (glibc or name == heap.TRIM_ENV)), (name, value)


@pytest.mark.parametrize(
    ("preload", "name"),
    [("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "tcmalloc"), ("libjemalloc.so.2", "jemalloc"),
     ("/opt/lib/libmimalloc.so", "mimalloc"), ("libhoard.so", "hoard")],
)  # fmt: skip
def test_each_known_malloc_preloaded_leaves_the_allocator_alone(monkeypatch, preload, name):
    from lib_vaebatch import heap

    for var in list(os.environ):
        if var.startswith("MALLOC_") or var == "GLIBC_TUNABLES":
            monkeypatch.delenv(var)
    monkeypatch.setenv("LD_PRELOAD", f"/lib/other.so:{preload}")
    assert heap.foreign_allocator() == f"{name} is preloaded"
    assert heap.reuse_available() is False


def test_without_malloc_trim_or_a_readable_resident_set_nothing_is_claimed(monkeypatch):
    from lib_vaebatch import heap

    cpu = torch.device("cpu")
    monkeypatch.setenv(heap.TRIM_ENV, "1")
    monkeypatch.setattr(heap, "_malloc_trim", lambda: None)  # not glibc
    assert heap.release_freed(cpu) is False
    pads: list[int] = []
    monkeypatch.setattr(heap, "_malloc_trim", lambda: lambda pad: pads.append(pad) or 1)
    assert heap.release_freed(cpu) is True and pads == [0], "all the free pages, no padding kept"
    assert heap.release_freed(torch.device("meta")) is False and pads == [0]
    monkeypatch.setattr(heap, "resident_bytes", lambda: None)
    assert heap.HeapGuard.starting_now(1 << 30, 1 << 20) is None
    monkeypatch.setattr(heap, "resident_bytes", lambda: 5000)
    guard = heap.HeapGuard.starting_now(1000, 300)
    assert guard is not None and guard.limit == 6000 and guard.rise == 300


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
