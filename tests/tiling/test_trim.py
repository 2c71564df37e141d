"""Tiled CPU runs hand freed heap pages back to the OS only where the next tile could take the
process past the run's plan (``heap.HeapGuard``): below that, freed tiles' pages stay for the next
tile (no fresh pages to fault in). The resident set is simulated here; the trimming itself is
measured in tests/engine/test_heap.py and the peaks against the plan in bench/bench_lean.py."""

from __future__ import annotations

import itertools

import pytest
import torch

import lib_vaebatch.heap as heap
from lib_vaebatch.heap import HeapGuard
from lib_vaebatch.tiling import TileSettings, decoder_program, run_tiled
from lib_vaebatch.tiling.exact import run_exact
from lib_vaebatch.tiling.plan import step_transient
from tests.support import tiny_autoencoder

BASE = 1 << 30
CPU = torch.device("cpu")


@pytest.fixture
def sim(monkeypatch):
    """Counts malloc_trim calls; ``level[0]`` is the resident set the run sees, in bytes above
    ``BASE``; a trim brings it down to ``level[1]``."""
    calls: list[int] = []
    level = [0, 0]

    def trim(pad: int) -> int:
        calls.append(pad)
        level[0] = level[1]
        return 1

    monkeypatch.setattr(heap, "_malloc_trim", lambda: trim)
    monkeypatch.setenv(heap.TRIM_ENV, "1")
    monkeypatch.setattr(heap, "resident_bytes", lambda: BASE + level[0])
    return calls, level


def test_the_guard_trims_where_the_largest_rise_seen_would_pass_the_limit(sim):
    calls, level = sim
    guard = HeapGuard(BASE + 1000, transient=100)
    # the rise learnt is 300 (0 -> 300); 750 + 300 would pass 1000
    for rss, trimmed in [(0, False), (300, False), (500, False), (700, False), (750, True)]:
        level[0] = rss
        assert guard.check(CPU) is trimmed, rss
        level[1] = 200
    assert guard.rise == 300 and len(calls) == 1 and guard.trims == 1
    assert guard.last == BASE + 200, "after a trim, the next rise is counted from where it left the heap"
    level[0] = 880  # a rise of 680 from there: learnt, and trimmed since 880 + 680 > 1000
    assert guard.check(CPU) is True and guard.rise == 680 and guard.trims == 2
    assert set(calls) == {0}, "malloc_trim(0): every free page"
    assert HeapGuard(BASE + 1000, transient=100).check(torch.device("meta")) is False


def test_the_planned_temporaries_count_before_any_rise_is_seen(sim):
    _, level = sim
    level[0] = 950
    assert HeapGuard(BASE + 1000, transient=100).check(CPU) is True
    assert HeapGuard(BASE + 1000, transient=10).check(CPU) is False


CASES = {
    "exact": {"mode": "exact"},
    "fast": {"mode": "fast"},
    "exact-lean": {"mode": "exact", "leanest": True},  # recomputation: checked after each tile
}


@pytest.mark.parametrize("case", list(CASES))
def test_tiled_runs_trim_only_near_their_plan(sim, case):
    calls, level = sim
    vae = tiny_autoencoder(4, seed=2)
    program = decoder_program(vae.decoder, vae.post_quant_conv)
    z = torch.randn(1, 4, 40, 40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = vae.decode(z).sample
        kw = dict(CASES[case], tile_size=8)
        low = TileSettings(**kw)
        out_low = run_tiled(program, z, low)
        assert calls == [], "well within the plan nothing is trimmed"
        high = TileSettings(**kw)
        trims_at: list[int] = []  # trims so far, at each tile's progress report

        def progress(done: int, total: int) -> None:
            # from the first tile on, the process sits just under its plan: every check trims
            transient = step_transient(program, (40, 40), 8)
            level[0] = level[1] = high.planned_bytes - transient + 1
            trims_at.append(len(calls))

        high.progress = progress
        out_high = run_tiled(program, z, high)
    assert high.used_mode == low.used_mode and (case != "exact-lean" or high.used_mode == "exact-lean")
    # checked after every tile, not only between steps: each tile's report follows a trim
    assert len(trims_at) > 2 * len(program.steps), "several tiles per step"
    assert all(b > a for a, b in itertools.pairwise(trims_at)), trims_at
    assert torch.equal(out_low, out_high)
    if case != "fast":
        assert (out_low - ref).abs().max().item() <= 1e-3


def test_a_run_without_a_plan_trims_after_every_step(sim):
    calls, _ = sim
    vae = tiny_autoencoder(4, seed=2)
    program = decoder_program(vae.decoder, vae.post_quant_conv)
    with torch.no_grad():
        run_exact(program, torch.randn(1, 4, 16, 16), tile=8)
    assert len(calls) == len(program.steps)
