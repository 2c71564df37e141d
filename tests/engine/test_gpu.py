"""CUDA paths: pinned staging buffers, the side copy stream, overlap with the next chunk."""

from __future__ import annotations

import pytest
import torch

from lib_vaebatch.devices import free_memory
from lib_vaebatch.engine.decode import decode_latents
from lib_vaebatch.engine.offload import Offloader
from lib_vaebatch.engine.options import EngineOptions
from tests.support import Recorder, marked_latents, overflowing_backend, tiny_backend

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_vae():
    vae = tiny_backend()
    vae.module.to("cuda")
    vae._device = torch.device("cuda", torch.cuda.current_device())
    return vae


def test_offloader_uses_pinned_staging_and_returns_pageable_copies():
    off = Offloader(torch.device("cuda"), torch.device("cpu"), torch.float32)
    assert off.asynchronous
    x = torch.randn(3, 3, 64, 64, device="cuda")
    x[1, 0, 5, 5] = float("nan")
    landed = off.submit(x, check=True).wait()
    assert landed.finite == [True, False, True]
    assert all(s.device.type == "cpu" and not s.is_pinned() for s in landed.samples)
    assert torch.equal(torch.stack(landed.samples)[0], x[0].cpu())
    assert all(buf.is_pinned() for pool in off._free.values() for buf in pool)


def test_overlapped_cpu_offload_equals_decoding_on_the_device(cuda_vae):
    latents = marked_latents(7, size=16)
    rec = Recorder(cuda_vae)
    overlapped = decode_latents(rec, latents, options=EngineOptions(max_chunk=2))
    on_device = decode_latents(cuda_vae, latents, options=EngineOptions(max_chunk=2, offload="device"))
    assert overlapped.chunk_sizes == [2, 2, 2, 1]
    for a, b in zip(overlapped.outputs, on_device.outputs, strict=True):
        assert a.device.type == "cpu" and b.device.type == "cuda"
        assert torch.equal(a, b.cpu())


def test_recovery_with_lookahead_on_cuda():
    vae = overflowing_backend()
    vae.module.to("cuda")
    vae._device = torch.device("cuda", torch.cuda.current_device())
    vae.set_dtype(torch.float16)
    latents = marked_latents(5, scale=0.5)
    latents[0] *= 40
    latents[3] *= 40
    result = decode_latents(vae, latents, options=EngineOptions(max_chunk=1))
    assert result.ok
    assert [r.status.value for r in result.reports].count("recovered") >= 1
    assert all(torch.isfinite(o).all() for o in result.outputs)


def test_free_memory_counts_the_allocators_unused_reserve():
    dev = torch.device("cuda", torch.cuda.current_device())
    before = free_memory(dev)
    block = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    del block  # reserved by the caching allocator, but free for us
    after = free_memory(dev)
    assert abs(after - before) < (64 << 20)


def test_tiled_decode_on_cuda_calibrates_and_matches(cuda_vae):
    from lib_vaebatch.tiling import TileSettings, estimate_peak, run_tiled
    from lib_vaebatch.tiling.plan import calibration_factor

    program = cuda_vae.tiling_program("decode")
    z = torch.randn(1, 4, 32, 32, device="cuda")
    key = ("gpu-test", "decode")
    with torch.no_grad():
        ref = cuda_vae.module.decode(z).sample
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = run_tiled(program, z, TileSettings(tile_size=8), key=key)
        peak = torch.cuda.max_memory_allocated() - before
    assert (out - ref).abs().max().item() <= 1e-3
    factor = calibration_factor(key, "exact", torch.float32)
    assert factor is not None
    planned = estimate_peak(program, (32, 32), 8, factor=factor)
    assert 0.5 * peak <= planned <= 2.0 * peak


def test_engine_measures_the_first_untiled_chunk(cuda_vae):
    from lib_vaebatch.engine.planner import measured_bytes_per_pixel

    result = decode_latents(cuda_vae, marked_latents(2, size=16), options=EngineOptions(max_chunk=2))
    assert result.ok
    assert any("memory model calibrated" in e for e in result.events)
    assert measured_bytes_per_pixel(cuda_vae, "decode", 128 * 128) is not None
