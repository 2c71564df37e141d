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
    assert estimate_peak(PROGRAM, base, 16, dtype=torch.float16) * 2 == estimate_peak(PROGRAM, base, 16)


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
