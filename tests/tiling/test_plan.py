from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lib_vaebatch.tiling import TileSettings, decoder_program, estimate_peak
from lib_vaebatch.tiling.fast import default_segment
from lib_vaebatch.tiling.plan import MAX_PLANNED_TILE, MIN_TILE, plan_tile
from tests.support import tiny_autoencoder

VAE = tiny_autoencoder(4)
PROGRAM = decoder_program(VAE.decoder, VAE.post_quant_conv)


def test_peak_grows_with_the_tile_and_shrinks_with_fast_mode():
    base = (128, 128)
    peaks = [estimate_peak(PROGRAM, base, t) for t in (8, 16, 32, 64)]
    assert peaks == sorted(peaks) and peaks[0] < peaks[-1]
    seg = default_segment(PROGRAM)
    assert estimate_peak(PROGRAM, base, 8, mode="fast", segment=seg) < estimate_peak(PROGRAM, base, 8)
    half, full = estimate_peak(PROGRAM, base, 16, dtype=torch.float16), estimate_peak(PROGRAM, base, 16)
    assert abs(half * 2 - full) <= 2, "half the bytes, up to rounding"


@settings(max_examples=40, deadline=None)
@given(budget=st.integers(1 << 20, 1 << 34), side=st.integers(1, 200))
def test_planned_tile_fits_the_budget_when_anything_does(budget, side):
    tile, peak = plan_tile(PROGRAM, (side, side), budget)
    assert MIN_TILE <= tile <= max(MIN_TILE, min(MAX_PLANNED_TILE, side))
    smallest = estimate_peak(PROGRAM, (side, side), MIN_TILE)
    assert peak <= budget or (tile == MIN_TILE and smallest > budget)


def test_settings_validate():
    import pytest

    with pytest.raises(ValueError, match=">= 8"):
        TileSettings(tile_size=4)
    with pytest.raises(ValueError, match="exact"):
        TileSettings(mode="quick")  # type: ignore[arg-type]


def test_whole_values_alive_never_take_more_storage_than_the_model_counts():
    """exact_live counts the whole values alive at each step; the storage they really hold (a view
    keeps its whole base alive, e.g. an output written into a larger input's memory) must not
    exceed it, or a planned peak is broken. The tiny VAE's up blocks narrow 64 -> 32 channels
    through a 1x1 shortcut: the case where an aliased output would pin its input's storage."""
    from lib_vaebatch.tiling.exact import run_steps, start_run
    from lib_vaebatch.tiling.plan import exact_live

    vae = tiny_autoencoder(4, layers_per_block=2, seed=2)
    for program, x in (
        (decoder_program(VAE.decoder, VAE.post_quant_conv), torch.randn(1, 4, 12, 12)),
        (decoder_program(vae.decoder, vae.post_quant_conv), torch.randn(2, 4, 10, 14)),
    ):
        run = start_run(program, x, 8, None, None, None)
        n = len(program.steps)
        base = (x.shape[2], x.shape[3])
        live = exact_live(program, base, x.shape[0], range(n))
        held: list[tuple[int, int]] = []

        def seen(value: int, _out: object, run=run, held=held) -> None:
            # one storage per distinct base pointer (a view and its base share it)
            storages = [t.untyped_storage() for t in run.values.values()]
            by_ptr = {st.data_ptr(): st.nbytes() for st in storages}
            held.append((value, sum(by_ptr.values())))

        with torch.no_grad():
            run_steps(run, 0, n, on_value=seen)
        assert len(held) == n
        narrowing = [i for i, s in enumerate(program.steps) if s.shortcut is not None]
        assert narrowing, "the case under test must be there"
        for value, nbytes in held:
            assert nbytes <= live[value - 1] * 4, (value, nbytes, live[value - 1] * 4)
