"""Exact tiled decode and encode equal the untiled forward, and really run in tiles."""

from __future__ import annotations

import pytest
import torch

from lib_vaebatch.tiling import decoder_program, encoder_program
from lib_vaebatch.tiling.exact import run_exact
from lib_vaebatch.tiling.program import Program
from tests.ldm_replica import replica_from
from tests.support import tiny_autoencoder

TOL = 1e-3  # fp32, any weights (the bound; observed ~2e-5)


class ConvSizes:
    """Forward pre-hooks on every Conv2d of the program: the largest input each conv saw, checked
    against one tile plus its halo at that conv's resolution."""

    def __init__(self, program: Program, tile: int, base: tuple[int, int]) -> None:
        self.bounds: dict[torch.nn.Module, int] = {}
        low = min(program.scales)
        for step in program.steps:
            f_out = int(program.scales[program.steps.index(step) + 1] / low)
            core = min(tile, max(base)) * f_out
            if step.kind == "attn":
                for m in (step.attention.q, step.attention.k, step.attention.v, step.attention.out):
                    self.bounds[m] = core
                continue
            pad = step.padding
            self.bounds[step.conv] = 2 * core + 1 if step.kind == "down" else core + 2 * pad
            if step.shortcut is not None:
                self.bounds[step.shortcut] = core + 2 * int(step.shortcut.padding[0])
        self.seen: dict[torch.nn.Module, int] = {}
        self.calls = 0
        self.handles = [
            m.register_forward_pre_hook(self._hook) for m in self.bounds if isinstance(m, torch.nn.Conv2d)
        ]

    def _hook(self, module, args):
        x = args[0]
        self.calls += 1
        self.seen[module] = max(self.seen.get(module, 0), x.shape[-1], x.shape[-2])

    def check(self) -> None:
        for h in self.handles:
            h.remove()
        assert self.seen, "no conv ran"
        too_big = {m: (s, self.bounds[m]) for m, s in self.seen.items() if s > self.bounds[m]}
        assert not too_big


SIZES = [(8, 8, 8), (12, 20, 8), (9, 17, 8), (24, 24, 8), (5, 7, 64), (16, 16, 4), (3, 11, 2)]


@pytest.mark.parametrize(("h", "w", "tile"), SIZES, ids=[f"{h}x{w}-t{t}" for h, w, t in SIZES])
@pytest.mark.parametrize("layout", ["diffusers", "ldm"])
def test_exact_decode_equals_untiled(h, w, tile, layout):
    vae = tiny_autoencoder(4, layers_per_block=2, seed=h * 31 + w)
    module = vae if layout == "diffusers" else replica_from(vae)
    program = decoder_program(module.decoder, module.post_quant_conv)
    z = torch.randn(2, 4, h, w, generator=torch.Generator().manual_seed(h + w))
    with torch.no_grad():
        ref = vae.decode(z).sample
        sizes = ConvSizes(program, tile, (h, w))
        out = run_exact(program, z, tile=tile)
    sizes.check()
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= TOL
    n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in sizes.bounds)
    tiles = -(-h // tile) * -(-w // tile)
    assert sizes.calls >= n_convs * (tiles if tile < max(h, w) else 1) * 0.5


@pytest.mark.parametrize(("h", "w", "tile"), [(64, 64, 4), (96, 160, 5), (40, 56, 3), (64, 64, 16)])
@pytest.mark.parametrize("layout", ["diffusers", "ldm"])
def test_exact_encode_equals_untiled(h, w, tile, layout):
    vae = tiny_autoencoder(4, layers_per_block=2, seed=h + w)
    module = vae if layout == "diffusers" else replica_from(vae)
    program = encoder_program(module.encoder, module.quant_conv)
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        ref = vae.quant_conv(vae.encoder(x))
        sizes = ConvSizes(program, tile, (h // 8, w // 8))
        out = run_exact(program, x, tile=tile)
    sizes.check()
    assert (out - ref).abs().max().item() <= TOL


def test_sixteen_channel_sd3_layout_decodes_exactly():
    vae = tiny_autoencoder(16, layers_per_block=1, seed=9)
    rep = replica_from(vae, sd3=True)
    z = torch.randn(1, 16, 14, 10)
    with torch.no_grad():
        out = run_exact(decoder_program(rep.decoder), z, tile=4)
        assert (out - vae.decode(z).sample).abs().max().item() <= TOL
        x = torch.rand(1, 3, 48, 64) * 2 - 1
        moments = run_exact(encoder_program(rep.encoder), x, tile=2)
        assert (moments - vae.encoder(x)).abs().max().item() <= TOL


def test_half_precision_tiles_stay_close():
    vae = tiny_autoencoder(4, seed=2)
    program = decoder_program(vae.decoder, vae.post_quant_conv)
    z = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        ref = vae.decode(z).sample
        torch.nn.Module.to(vae, torch.bfloat16)
        out = run_exact(program, z.bfloat16(), tile=8).float()
        torch.nn.Module.to(vae, torch.float32)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - ref).abs().mean().item() < 0.05
