"""Programs read off diffusers and ldm/sgm/SD3 module layouts; what is refused."""

from __future__ import annotations

import pytest
from diffusers import AutoencoderKL

from lib_vaebatch.tiling import TilingUnsupportedError, decoder_program, encoder_program
from lib_vaebatch.tiling.fast import clean_cuts, default_segment
from tests.ldm_replica import replica_from
from tests.support import tiny_autoencoder


def test_diffusers_and_ldm_layouts_give_the_same_program():
    vae = tiny_autoencoder(4, layers_per_block=2)
    rep = replica_from(vae)
    a = decoder_program(vae.decoder, vae.post_quant_conv)
    b = decoder_program(rep.decoder, rep.post_quant_conv)
    assert [s.kind for s in a.steps] == [s.kind for s in b.steps]
    assert list(a.scales) == list(b.scales) and list(a.channels) == list(b.channels)
    # the latent, then each upsampler doubles the scale: 1 (post-quant, conv_in, mid, first up
    # block), 2, 4, 8 (after the third upsampler, through to the output conv)
    ups = [i + 1 for i, s in enumerate(a.steps) if s.kind == "up"]
    assert len(ups) == 3
    want = [1 if v < ups[0] else 2 if v < ups[1] else 4 if v < ups[2] else 8 for v in range(len(a.steps) + 1)]
    assert list(a.scales) == want
    assert a.out_channels == 3 and a.channels[-1] == 3 and a.channels[0] == 4
    # one post-quant conv, conv_in, mid (2 resnets of 2 convs + attention), 4 up blocks of 3 resnets,
    # 3 upsamplers, the output conv
    assert len(a.steps) == 1 + 1 + 5 + 4 * 3 * 2 + 3 + 1
    enc = encoder_program(rep.encoder, rep.quant_conv)
    assert enc.scales[-1] == 1 / 8 and enc.out_channels == 8 and enc.kind == "encoder"


def test_sd3_layout_without_quant_convs():
    rep = replica_from(tiny_autoencoder(16), sd3=True)
    prog = decoder_program(rep.decoder)
    assert prog.in_channels == 16 and prog.steps[0].name == "decoder.conv_in"


def test_fast_segments_are_clean_cuts():
    vae = tiny_autoencoder(4)
    dec = decoder_program(vae.decoder, vae.post_quant_conv)
    first, last = default_segment(dec)
    assert dec.steps[first].kind == "up" and last == len(dec.steps) and first in clean_cuts(dec)
    enc = encoder_program(vae.encoder, vae.quant_conv)
    first, last = default_segment(enc)
    assert first == 0 and enc.steps[last - 1].kind == "down"


def test_unsupported_layouts_are_refused():
    attn_up = AutoencoderKL(
        block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1,
    )  # fmt: skip
    with pytest.raises(TilingUnsupportedError, match="attention in an up block"):
        decoder_program(attn_up.decoder, attn_up.post_quant_conv)
    with pytest.raises(TilingUnsupportedError, match="unknown decoder layout"):
        decoder_program(attn_up.encoder)
