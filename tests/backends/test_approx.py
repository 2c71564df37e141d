from __future__ import annotations

import pytest
import torch

from lib_vaebatch.backends import ApproxVAE, load_vae
from lib_vaebatch.families import FAMILIES, get_family, to_scaled


@pytest.mark.parametrize("name", list(FAMILIES))
def test_decode_is_the_family_linear_map(name):
    fam = get_family(name)
    vae = ApproxVAE(fam)
    raw = torch.randn(2, fam.latent_channels, 3, 4)
    out = vae.decode(raw)
    assert out.shape == (2, 3, 24, 32)
    z = to_scaled(raw, fam.scaling_factor, fam.shift_factor)
    expected = (
        torch.einsum("bchw,cr->brhw", z, torch.tensor(fam.rgb_factors))
        + torch.tensor(fam.rgb_bias)[None, :, None, None]
    )
    # bilinear upsampling keeps the mean of each 8x8 block only approximately; check a flat case exactly
    flat = torch.ones(1, fam.latent_channels, 2, 2)
    flat_out = vae.decode(flat)
    flat_expected = (
        torch.einsum(
            "bchw,cr->brhw",
            to_scaled(flat, fam.scaling_factor, fam.shift_factor),
            torch.tensor(fam.rgb_factors),
        )
        + torch.tensor(fam.rgb_bias)[None, :, None, None]
    )
    assert torch.allclose(
        flat_out, flat_expected.expand(1, 3, 2, 2).repeat_interleave(8, 2).repeat_interleave(8, 3), atol=1e-5
    )
    assert torch.allclose(torch.nn.functional.avg_pool2d(out, 8).mean(), expected.mean(), atol=0.05)


def test_load_vae_default_is_the_labelled_approximation():
    vae = load_vae()
    assert isinstance(vae, ApproxVAE) and vae.family.name == "sd1" and vae.family_source == "default"
    assert vae.display_name == "approx-sd1 (preview quality)"
    assert load_vae("approx", family="flux").latent_channels == 16


def test_unknown_family_lists_the_known_ones():
    with pytest.raises(ValueError, match="known: sd1, sd2, sdxl, sd3, flux"):
        get_family("sd4")
