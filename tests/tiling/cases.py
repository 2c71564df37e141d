"""The tiny tiling case shared by the exact-lean and spill tests: a seeded VAE's decoder or encoder
program (diffusers layout, or the ldm replica of the same weights), its input, untiled output
and the module the program was read from."""

from __future__ import annotations

import torch

from lib_vaebatch.tiling import decoder_program, encoder_program
from tests.ldm_replica import replica_from
from tests.support import tiny_autoencoder

#: The case's latent grid (its encoder input is 8x that).
BASE = (12, 18)


def program_case(layout: str, op: str):  # -> (Program, input, untiled output, module)
    vae = tiny_autoencoder(4, layers_per_block=1, seed=5)
    module = vae if layout == "diffusers" else replica_from(vae)
    if op == "decode":
        program = decoder_program(module.decoder, module.post_quant_conv)
        x = torch.randn(1, 4, *BASE, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            ref = vae.decode(x).sample
    else:
        program = encoder_program(module.encoder, module.quant_conv)
        x = torch.rand(1, 3, 8 * BASE[0], 8 * BASE[1], generator=torch.Generator().manual_seed(3)) * 2 - 1
        with torch.no_grad():
            ref = vae.quant_conv(vae.encoder(x))
    return program, x, ref, module
