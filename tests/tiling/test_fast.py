"""Fast tiled decode/encode: independent high-resolution tiles with estimated statistics."""

from __future__ import annotations

import pytest
import torch

from lib_vaebatch.tiling import decoder_program, encoder_program
from lib_vaebatch.tiling.exact import run_exact
from lib_vaebatch.tiling.fast import default_segment, run_fast, sample_tiles
from tests.ldm_replica import replica_from
from tests.support import psnr, structured_image, tiny_autoencoder


@pytest.mark.parametrize("size", [256, 512])
@pytest.mark.parametrize("seed", [11, 12, 13])
def test_fast_decode_of_structured_latents_is_above_40_db(trained_vae, size, seed):
    program = decoder_program(trained_vae.decoder, trained_vae.post_quant_conv)
    tile = 8
    grid = size // 8 // tile
    assert len(sample_tiles(grid, grid)) < grid * grid, "statistics must really be estimated"
    with torch.no_grad():
        z = trained_vae.encode(structured_image(size, size, seed)).latent_dist.mean
        ref = trained_vae.decode(z).sample
        out = run_fast(program, z, tile=tile)
    assert psnr(out, ref) >= 40.0


def test_fast_decode_on_noise_latents_and_ldm_layout(trained_vae):
    rep = replica_from(trained_vae)
    program = decoder_program(rep.decoder, rep.post_quant_conv)
    z = torch.randn(1, 4, 32, 40, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert psnr(run_fast(program, z, tile=8), trained_vae.decode(z).sample) >= 40.0


def test_fast_mode_with_few_tiles_samples_them_all_and_is_exact():
    vae = tiny_autoencoder(4, seed=4)
    program = decoder_program(vae.decoder, vae.post_quant_conv)
    z = torch.randn(1, 4, 16, 16)
    assert len(sample_tiles(2, 2)) == 4
    with torch.no_grad():
        assert (run_fast(program, z, tile=8) - vae.decode(z).sample).abs().max().item() <= 1e-3


def test_fast_encode_is_close(trained_vae):
    program = encoder_program(trained_vae.encoder, trained_vae.quant_conv)
    x = structured_image(256, 256, 21)
    with torch.no_grad():
        ref = trained_vae.quant_conv(trained_vae.encoder(x))
        out = run_fast(program, x, tile=8)
    assert ((out - ref).norm() / ref.norm()).item() < 0.01


def test_fast_segment_never_materialises_its_full_resolution_values():
    # every conv of the segment, in the sample tiles, the other tiles and the proxy pass alike,
    # sees one tile and its halo: never the image, nor the proxy's half-resolution image
    vae = tiny_autoencoder(4, seed=6)
    program = decoder_program(vae.decoder, vae.post_quant_conv)
    first, last = default_segment(program)
    tile, z = 8, torch.randn(1, 4, 40, 40)
    f = program.factor(last)
    assert len(sample_tiles(5, 5)) < 25, "the proxy pass must run"
    halo = sum(s.padding for s in program.steps[first:last])
    largest_tile = (tile * f + 2 * halo) ** 2
    proxy_image = (40 // 2 * f) ** 2
    assert largest_tile < proxy_image / 4
    seen = []

    def hook(module, args):
        seen.append(args[0].shape[-1] * args[0].shape[-2])

    convs = [s.conv for s in program.steps[first:last]]
    handles = [c.register_forward_pre_hook(hook) for c in convs]
    with torch.no_grad():
        run_fast(program, z, tile=tile)
    for h in handles:
        h.remove()
    assert max(seen) <= largest_tile


def test_random_weights_are_harder_but_bounded():
    # A randomly initialised decoder outputs values of +-5..10 and amplifies statistic errors; the
    # estimate is still usable there (see docs/tiling.md for the measured range).
    vae = tiny_autoencoder(4, layers_per_block=2, seed=1)
    program = decoder_program(vae.decoder, vae.post_quant_conv)
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert psnr(run_fast(program, z, tile=8), vae.decode(z).sample) >= 30.0
        assert torch.equal(run_exact(program, z, tile=8), run_exact(program, z, tile=8))
