"""Tiled CPU runs hand freed heap pages back to the OS only once the process's resident set has
risen a share of the planned peak (``HEAP_CAP_FRACTION``): below that, freed tiles' pages stay for
the next tile (no fresh pages to fault in); above it, they go back between tiles, so the peak
keeps to the plan. The resident set is simulated here; the trimming itself is measured in
tests/engine/test_heap.py and the peaks against the plan in bench/bench_lean.py."""

from __future__ import annotations

import pytest
import torch

import lib_vaebatch.heap as heap
import lib_vaebatch.tiling.exact as exact
from lib_vaebatch.tiling import HEAP_CAP_FRACTION, TileSettings, decoder_program, run_tiled
from lib_vaebatch.tiling.exact import run_exact
from tests.support import tiny_autoencoder

BASE = 1 << 30


@pytest.fixture
def trims(monkeypatch):
    """Counts malloc_trim calls; ``level[0]`` is the resident set the run sees, in bytes above
    ``BASE`` once the run has started."""
    calls: list[int] = []
    level = [None]
    monkeypatch.setattr(heap, "_malloc_trim", lambda: calls.append)
    monkeypatch.setenv(heap.TRIM_ENV, "1")

    def resident() -> int:
        return BASE if level[0] is None else BASE + level[0]

    monkeypatch.setattr(heap, "resident_bytes", resident)
    monkeypatch.setattr(exact, "resident_bytes", resident)
    return calls, level


CASES = {
    "exact": {"mode": "exact"},
    "fast": {"mode": "fast"},
    "exact-lean": {"mode": "exact", "leanest": True},  # recomputation: the trim after each tile
}


@pytest.mark.parametrize("case", list(CASES))
def test_freed_pages_go_back_only_above_the_planned_share(trims, case):
    calls, level = trims
    vae = tiny_autoencoder(4, seed=2)
    program = decoder_program(vae.decoder, vae.post_quant_conv)
    z = torch.randn(1, 4, 40, 40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = vae.decode(z).sample
        kw = dict(CASES[case], tile_size=8)
        low = TileSettings(**kw)
        out_low = run_tiled(program, z, low)
        assert calls == [], "below the share of the plan nothing is trimmed"
        high = TileSettings(**kw)

        def progress(done: int, total: int) -> None:
            level[0] = int(HEAP_CAP_FRACTION * high.planned_bytes) + 1  # past the share from here on

        high.progress = progress
        out_high = run_tiled(program, z, high)
    assert high.used_mode == low.used_mode and (case != "exact-lean" or high.used_mode == "exact-lean")
    assert len(calls) >= 3, "above it, freed pages go back between steps or tiles"
    assert torch.equal(out_low, out_high)
    if case != "fast":
        assert (out_low - ref).abs().max().item() <= 1e-3


def test_a_run_without_a_plan_trims_after_every_step(trims):
    calls, _ = trims
    vae = tiny_autoencoder(4, seed=2)
    program = decoder_program(vae.decoder, vae.post_quant_conv)
    with torch.no_grad():
        run_exact(program, torch.randn(1, 4, 16, 16), tile=8)
    assert len(calls) == len(program.steps)
