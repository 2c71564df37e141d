"""Tiling wired into the engine: the out-of-memory fallback, always-tiled, automatic tiling,
progress per tile and cancel between tiles."""

from __future__ import annotations

import pytest
import torch

from lib_vaebatch.engine.decode import decode_latents
from lib_vaebatch.engine.encode import encode_pixels
from lib_vaebatch.engine.options import EngineOptions
from lib_vaebatch.engine.results import Status
from tests.support import OOMBigTiles, OOMTiledWhere, OOMUntiled, Recorder, marked_latents, psnr, tiny_backend


@pytest.fixture(scope="module")
def vae():
    return tiny_backend(layers_per_block=2)


def _ref(vae, latents):
    return decode_latents(vae, latents, options=EngineOptions(tiling="never"))


def test_oom_at_the_untiled_size_falls_back_to_real_tiles_and_completes(vae):
    latents = marked_latents(3, size=24)
    reference = _ref(vae, latents)
    oom = OOMUntiled(vae)
    result = decode_latents(oom, latents, options=EngineOptions(max_chunk=2, tile_size=8))
    assert result.ok and all(r.tiled for r in result.reports)
    assert any("out of memory at chunk 2" in e for e in result.events)
    assert any("continues in tiles" in e for e in result.events)
    for a, b in zip(result.outputs, reference.outputs, strict=True):
        assert (a - b).abs().max().item() <= 1e-3
    assert oom.calls == [], "no untiled decode ever succeeded"


def test_oom_inside_tiles_halves_the_tile_down_to_the_minimum_and_keeps_every_image(vae):
    latents = marked_latents(3, size=40)
    reference = _ref(vae, latents)
    oom = OOMBigTiles(vae, limit=10)
    result = decode_latents(oom, latents, options=EngineOptions(max_chunk=1, tile_size=40))
    assert result.ok and all(r.tiled for r in result.reports)
    assert oom.tile_sizes[:3] == [40, 20, 10], "halved 40 -> 20 -> 10, then every sample ran at 10"
    assert set(oom.tile_sizes[3:]) == {10}
    assert any("out of memory in tiles of 40; retrying with tiles of 20" in e for e in result.events)
    for a, b in zip(result.outputs, reference.outputs, strict=True):
        assert (a - b).abs().max().item() <= 1e-3

    # When every tiled path runs out of memory, down to plain tiles of the minimum size, that
    # sample fails with a clear reason (and only then).
    stuck = decode_latents(OOMBigTiles(vae, limit=4), latents[:1], options=EngineOptions(tile_size=16))
    assert not stuck.ok
    assert stuck.reports[0].status is Status.FAILED
    assert "even in plain tiles of 8" in stuck.reports[0].message
    assert any("last resort: plain independent tiles" in e for e in stuck.events)


def test_ladder_order_smaller_tiles_then_leaner_exact_then_fast_then_plain_tiles(vae):
    """Everything but plain tiles runs out of memory: the engine walks the whole ladder in the
    issue's order and the sample comes back, labelled as plain tiles everywhere it is reported."""
    latents = marked_latents(2, size=40)
    reference = _ref(vae, latents)
    oom = OOMTiledWhere(vae, lambda s: s.used_mode != "plain")
    result = decode_latents(oom, latents, options=EngineOptions(max_chunk=1, tile_size=32))
    assert result.ok, [r.message for r in result.reports]
    modes = [m for m, _t, _p in oom.runs]
    first_fast, first_plain = modes.index("fast"), modes.index("plain")
    assert all(m in ("exact", "exact-spill", "exact-lean") for m in modes[:first_fast])
    assert all(m == "fast" for m in modes[first_fast:first_plain])
    tiles = [t for m, t, _p in oom.runs[:first_fast]]
    assert tiles[:3] == [32, 16, 8], "smaller tiles first"
    planned = [p for m, t, p in oom.runs[:first_fast] if t == 8]
    assert len(planned) >= 2 and planned == sorted(planned, reverse=True) and planned[-1] < planned[0], (
        "then exact schedules within less and less memory"
    )
    assert {"exact-spill", "exact-lean"} & set(modes[:first_fast]), "the leaner variants spill or recompute"
    assert [r.tile_mode for r in result.reports] == ["plain", "plain"]
    assert "plain tiles ×2" in result.summary()
    assert any("last resort: plain independent tiles" in e for e in result.events)
    # plain tiles are the peers' method: close, not exact
    for a, b in zip(result.outputs, reference.outputs, strict=True):
        assert a.shape == b.shape and torch.isfinite(a).all()
        assert (a - b).abs().max().item() > 1e-3
    # the next sample started where the ladder ended: no second walk down
    assert modes.count("plain") == 2


@pytest.mark.parametrize(
    ("spill", "tile_mode", "label"),
    [(False, "exact", "exact-lean"), (True, "exact", "exact-spill"), (True, "exact-lean", "exact-lean")],
)
def test_a_planned_peak_limit_is_met_by_recomputation_or_spilling_and_stays_exact(
    vae, spill, tile_mode, label
):
    """Runs planned above a peak limit fail (as a device of that size would); the engine lowers
    its planned peak until a leaner exact schedule fits (values spilled to a file, or, with
    spilling off or the tile mode ``exact-lean``, recomputed), and the output is still exact."""
    latents = marked_latents(2, size=32)
    reference = _ref(vae, latents)
    program = vae.tiling_program("decode")
    from lib_vaebatch.tiling import TileSettings, default_store, plan

    z = latents[:1]
    store = default_store(torch.device("cpu")) if label == "exact-spill" else None
    whole = plan(program, z, TileSettings(tile_size=8)).planned_bytes
    least = plan(program, z, TileSettings(tile_size=8, leanest=True, budget=0, spill=store)).planned_bytes
    limit = (whole + least) // 2
    oom = OOMTiledWhere(vae, lambda s: s.planned_bytes > limit)
    options = EngineOptions(max_chunk=1, tile_size=8, spill=spill, tile_mode=tile_mode)  # type: ignore[arg-type]
    result = decode_latents(oom, latents, options=options)
    assert result.ok
    assert [r.tile_mode for r in result.reports] == [label, label]
    assert f"{label} ×2" in result.summary()
    assert any("retrying exact within" in e for e in result.events)
    assert all(p <= limit for m, t, p in oom.runs[-2:])
    for a, b in zip(result.outputs, reference.outputs, strict=True):
        assert (a - b).abs().max().item() <= 1e-3


@pytest.mark.parametrize(("mode", "size"), [("exact", 24), ("fast", 16), ("fast", 24)])
def test_always_tiled_even_for_a_few_tiles(vae, mode, size):
    latents = marked_latents(2, size=size)
    reference = _ref(vae, latents)
    result = decode_latents(vae, latents, options=EngineOptions(tiling="always", tile_mode=mode, tile_size=8))
    assert result.ok and all(r.tiled for r in result.reports)
    for a, b in zip(result.outputs, reference.outputs, strict=True):
        if mode == "exact" or size == 16:  # 2x2 tiles: fast mode samples them all, so it is exact too
            assert (a - b).abs().max().item() <= 1e-3
        else:  # 3x3 tiles: statistics estimated (random weights: see test_fast.py)
            assert psnr(a, b) >= 30.0


def test_automatic_tiling_when_one_sample_exceeds_the_budget(vae):
    latents = marked_latents(1, size=24)
    result = decode_latents(vae, latents, options=EngineOptions(memory_budget=64 << 20))
    assert result.ok and result.reports[0].tiled
    assert (result.outputs[0] - _ref(vae, latents).outputs[0]).abs().max().item() <= 1e-3
    never = decode_latents(vae, latents, options=EngineOptions(memory_budget=64 << 20, tiling="never"))
    assert not never.reports[0].tiled


def test_progress_per_tile_and_cancel_between_tiles_keeps_finished_images(vae):
    latents = marked_latents(3, size=24)
    texts = []
    state = {"tiles_in_second": 0}

    def progress(done, total, text):
        texts.append(text)
        if "sample 1: tile" in text:
            state["tiles_in_second"] += 1

    result = decode_latents(
        vae, latents, options=EngineOptions(tiling="always", tile_size=8),
        progress=progress, cancel=lambda: state["tiles_in_second"] >= 5,
    )  # fmt: skip
    assert result.cancelled
    assert [r.status for r in result.reports] == [Status.OK, Status.CANCELLED, Status.CANCELLED]
    assert result.outputs[0] is not None and result.outputs[1] is None
    assert any("sample 0: tile 1/" in t for t in texts)


def test_tiled_encode_equals_untiled(vae):
    pixels = (torch.rand(2, 3, 192, 160, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    untiled = encode_pixels(vae, pixels, options=EngineOptions(tiling="never"))
    tiled = encode_pixels(vae, pixels, options=EngineOptions(tiling="always", tile_size=8))
    assert tiled.ok and all(r.tiled for r in tiled.reports)
    for a, b in zip(tiled.outputs, untiled.outputs, strict=True):
        assert (a - b).abs().max().item() <= 1e-3


def test_approximate_vae_has_no_tiled_path_but_needs_none():
    from lib_vaebatch.backends import ApproxVAE

    vae = ApproxVAE()
    assert not vae.supports_tiling("decode")
    result = decode_latents(vae, marked_latents(2, size=16), options=EngineOptions(memory_budget=1))
    assert result.ok and not result.reports[0].tiled


def test_sixteen_channel_vae_tiles():
    vae = tiny_backend(16, family="sd3")
    latents = marked_latents(1, channels=16, size=16)
    out = decode_latents(Recorder(vae), latents, options=EngineOptions(tiling="always", tile_size=8))
    assert out.ok and out.reports[0].tiled
