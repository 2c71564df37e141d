"""Exact-lean schedules: memory bounded by the tile through recomputation, output still exact; the
planner keeps its budget; plain independent tiles (the last rung) behave as the peers' method."""

from __future__ import annotations

import pytest
import torch

from lib_vaebatch.tiling import (
    TileSettings,
    decoder_program,
    minimum_budget,
    plan,
    run_tiled,
)
from lib_vaebatch.tiling.lean import clean_cuts, run_lean, schedule
from lib_vaebatch.tiling.plain import plain_starts, run_plain
from tests.support import psnr, tiny_autoencoder
from tests.tiling.cases import program_case

TOL = 1e-3


class ConvCalls:
    """Counts calls of every Conv2d in a module."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.handles = [
            m.register_forward_pre_hook(self._hook)
            for m in module.modules()
            if isinstance(m, torch.nn.Conv2d)
        ]

    def _hook(self, module, args):  # type: ignore[no-untyped-def]
        self.calls += 1

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("layout", ["diffusers", "ldm"])
@pytest.mark.parametrize("op", ["decode", "encode"])
def test_every_budget_gives_the_untiled_output_and_less_memory_costs_more_work(layout, op):
    program, x, ref, module = program_case(layout, op)
    base = (12, 18)
    whole = schedule(program, base, 8)
    least = schedule(program, base, 8, leanest=True)
    assert not whole.lean and least.lean and least.peak < whole.peak / 2
    # every budget on one layout; the other layout (same weights, other module tree) at the leanest
    mid = (least.peak + whole.peak) // 2
    budgets = sorted({least.peak, mid, whole.peak}) if layout == "diffusers" else [least.peak, whole.peak]
    peaks, costs, calls = [], [], []
    for budget in budgets:
        s = schedule(program, base, 8, budget=budget)
        assert s.peak <= budget, "the planner keeps any budget at or above its minimum"
        counter = ConvCalls(module)
        with torch.no_grad():
            out = run_lean(program, x, s)
        counter.close()
        assert (out - ref).abs().max().item() <= TOL, (budget, s.segments)
        peaks.append(s.peak)
        costs.append(s.cost)
        calls.append(counter.calls)
    assert peaks == sorted(peaks) and costs == sorted(costs, reverse=True)
    assert calls[0] > calls[-1], "the leanest schedule recomputes: more conv calls than whole values"


def test_below_the_minimum_the_leanest_schedule_is_returned_and_the_minimum_is_known():
    vae = tiny_autoencoder(4, layers_per_block=1, seed=1)
    program = decoder_program(vae.decoder, vae.post_quant_conv)
    z = torch.empty(1, 4, 32, 32)
    least = minimum_budget(program, z)
    settings = TileSettings(budget=least // 4)
    p = plan(program, z, settings)
    assert p.planned_bytes == least and p.mode == "exact-lean"
    assert plan(program, z, TileSettings(budget=least)).planned_bytes <= least
    # planned peaks fall with the tile: the memory is bounded by the tile, not the image
    by_tile = [schedule(program, (32, 32), t, leanest=True).peak for t in (32, 16, 8)]
    assert by_tile == sorted(by_tile, reverse=True) and by_tile[-1] < by_tile[0] / 2


def test_leanest_state_is_a_small_fraction_of_whole_values_at_a_larger_size():
    """At 1024² on the SD-shaped decoder of the tests (tiny widths), the leanest schedule keeps
    only low-resolution values and the image; whole-value exact mode keeps full-resolution ones."""
    vae = tiny_autoencoder(4, layers_per_block=1, seed=1)
    program = decoder_program(vae.decoder, vae.post_quant_conv)
    whole = schedule(program, (128, 128), 16)
    least = schedule(program, (128, 128), 16, leanest=True)
    full_res_value = 4 * program.channels[-2] * 1024 * 1024
    assert whole.peak > 2 * full_res_value
    assert least.peak < full_res_value


def test_cuts_are_where_no_later_step_reads_an_earlier_value():
    vae = tiny_autoencoder(4, layers_per_block=2)
    program = decoder_program(vae.decoder, vae.post_quant_conv)
    cuts = clean_cuts(program)
    assert cuts[0] == 0 and cuts[-1] == len(program.steps)
    for c in cuts:
        for step in program.steps[c:]:
            assert step.src >= c and (step.skip is None or step.skip >= c)


def test_plain_tiles_are_the_independent_tile_method_not_the_exact_one():
    vae = tiny_autoencoder(4, layers_per_block=1, seed=4)
    program = decoder_program(vae.decoder, vae.post_quant_conv)
    g = torch.Generator().manual_seed(0)
    # a smooth latent (structured, like a real image's), so blending over the overlap is visible
    z = torch.nn.functional.interpolate(torch.randn(1, 4, 6, 6, generator=g), size=(40, 40), mode="bilinear")
    with torch.no_grad():
        ref = vae.decode(z).sample
        one = run_plain(program, z, tile=40)  # a single tile is the untiled run
        tiled = run_plain(program, z, tile=16, overlap=4)
    assert (one - ref).abs().max().item() <= TOL
    assert tiled.shape == ref.shape and torch.isfinite(tiled).all()
    assert (tiled - ref).abs().max().item() > TOL, "per-tile statistics: not exact"
    assert psnr(tiled, ref) > 10.0
    assert plain_starts(40, 16, 4) == [0, 12, 24]
    assert plain_starts(16, 16, 4) == [0]


@pytest.mark.parametrize("mode", ["exact", "auto", "fast", "plain"])
def test_run_tiled_reports_what_ran(mode):
    vae = tiny_autoencoder(4, layers_per_block=1, seed=2)
    program = decoder_program(vae.decoder, vae.post_quant_conv)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    least = minimum_budget(program, z)
    settings = TileSettings(mode=mode, budget=least, tile_size=8)  # type: ignore[arg-type]
    with torch.no_grad():
        ref = vae.decode(z).sample
        out = run_tiled(program, z, settings)
    assert settings.used_mode == {"exact": "exact-lean", "auto": "exact-lean"}.get(mode, mode)
    assert settings.used_tile == 8 and settings.planned_bytes is not None and settings.least_bytes is not None
    if mode in ("exact", "auto"):
        assert settings.planned_bytes <= least and (out - ref).abs().max().item() <= TOL


def test_exact_lean_mode_recomputes_and_never_spills(tmp_path):
    # given a spill store, "exact" spills where memory is short; "exact-lean" recomputes instead
    from lib_vaebatch.tiling import SpillStore

    program, x, ref, _module = program_case("diffusers", "decode")
    store = SpillStore("disk", 1 << 30, str(tmp_path))
    least = minimum_budget(program, x, spill=store)
    runs = {}
    for mode in ("exact", "exact-lean"):
        settings = TileSettings(mode=mode, budget=least, tile_size=8, spill=store)  # type: ignore[arg-type]
        with torch.no_grad():
            out = run_tiled(program, x, settings)
        assert (out - ref).abs().max().item() <= TOL
        runs[mode] = settings
    assert runs["exact"].used_mode == "exact-spill" and runs["exact"].spilled_bytes > 0
    assert runs["exact-lean"].used_mode == "exact-lean" and runs["exact-lean"].spilled_bytes == 0
    assert runs["exact-lean"].least_bytes > runs["exact"].least_bytes, "without the store, more memory"
