"""Loading single-file VAEs (ldm or diffusers naming), whole checkpoints and diffusers folders."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lib_vaebatch.backends import load_vae
from lib_vaebatch.backends.diffusers_vae import VAELoadError
from lib_vaebatch.backends.keys import detect_naming, diffusers_to_ldm, ldm_to_diffusers
from tests.support import save_module, tiny_autoencoder


@pytest.fixture(scope="module", params=[4, 16], ids=["4ch", "16ch"])
def module(request):
    return tiny_autoencoder(request.param, layers_per_block=2, seed=3)


def _decode(vae, z):
    with torch.no_grad():
        return vae.decode(z)


def test_our_ldm_naming_matches_diffusers_own_converter(module):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    state = module.state_dict()
    ldm = diffusers_to_ldm(state)
    assert detect_naming(ldm) == "ldm"
    assert any(".nin_shortcut." in k for k in ldm) and any(k.startswith("decoder.up.3.") for k in ldm)
    assert ldm["decoder.mid.attn_1.q.weight"].ndim == 4  # ldm attention projections are 1x1 convs
    # diffusers' own ldm -> diffusers conversion must give back the module's exact state dict...
    theirs = convert_ldm_vae_checkpoint(dict(ldm), dict(module.config))
    assert set(theirs) == set(state)
    for k in state:
        assert torch.equal(theirs[k].reshape(state[k].shape), state[k]), k
    # ...and so must ours.
    ours = ldm_to_diffusers(ldm)
    assert set(ours) == set(state)
    assert all(torch.equal(ours[k], state[k]) for k in state)


def test_ldm_and_diffusers_named_files_decode_identically(module, tmp_path):
    fam = "sd1" if module.config.latent_channels == 4 else "flux"
    save_module(module, tmp_path / "diffusers.safetensors")
    save_file(
        {k: v.contiguous() for k, v in diffusers_to_ldm(module.state_dict()).items()},
        str(tmp_path / "ldm.safetensors"),
    )
    a = load_vae(tmp_path / "diffusers.safetensors", device="cpu")
    b = load_vae(tmp_path / "ldm.safetensors", device="cpu")
    assert a.family.name == b.family.name == fam and a.family_source == "channels"
    z = torch.randn(2, module.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    out_a, out_b = _decode(a, z), _decode(b, z)
    assert out_a.shape == (2, 3, 64, 64)
    assert torch.equal(out_a, out_b)
    assert torch.equal(out_a, _decode_module(module, z))
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(a.encode(x).mean, b.encode(x).mean)


def _decode_module(module, z):
    with torch.no_grad():
        return module.decode(z).sample


def test_whole_checkpoint_loads_only_its_vae(tmp_path):
    module = tiny_autoencoder(4, seed=1)
    state = {
        f"first_stage_model.{k}": v.contiguous() for k, v in diffusers_to_ldm(module.state_dict()).items()
    }
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4, 4, 3, 3)
    state["first_stage_model.loss.logvar"] = torch.zeros(())
    save_file(state, str(tmp_path / "checkpoint.safetensors"))
    vae = load_vae(tmp_path / "checkpoint.safetensors", device="cpu")
    z = torch.randn(1, 4, 8, 8)
    assert torch.equal(_decode(vae, z), _decode_module(module, z))


def test_family_detection_order(tmp_path):
    module = tiny_autoencoder(4, seed=2)
    assert load_vae(save_module(module, tmp_path / "a.safetensors"), device="cpu").family.name == "sd1"
    named = load_vae(save_module(module, tmp_path / "my-sdxl-vae.safetensors"), device="cpu")
    assert (named.family.name, named.family_source, named.scaling_factor) == ("sdxl", "filename", 0.13025)
    meta = load_vae(
        save_module(
            module,
            tmp_path / "b.safetensors",
            metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base/vae"},
        ),
        device="cpu",
    )
    assert (meta.family.name, meta.family_source) == ("sdxl", "metadata")
    given = load_vae(tmp_path / "my-sdxl-vae.safetensors", family="sd2", device="cpu")
    assert (given.family.name, given.family_source) == ("sd2", "given")
    with pytest.raises(VAELoadError, match="family flux has 16 latent channels but the VAE has 4"):
        load_vae(tmp_path / "a.safetensors", family="flux", device="cpu")

    sixteen = save_module(tiny_autoencoder(16, seed=2), tmp_path / "c.safetensors")
    assert load_vae(sixteen, device="cpu").family.name == "flux"
    sd3 = load_vae(sixteen, family="sd3", device="cpu")
    assert (sd3.scaling_factor, sd3.shift_factor) == (1.5305, 0.0609)


def test_diffusers_folder(tmp_path):
    module = tiny_autoencoder(4, seed=4)
    module.register_to_config(scaling_factor=0.13025)
    module.save_pretrained(tmp_path / "pipe" / "vae", safe_serialization=True)
    vae = load_vae(tmp_path / "pipe", device="cpu")
    assert (vae.family.name, vae.family_source) == ("sdxl", "config")
    z = torch.randn(1, 4, 8, 8)
    assert torch.equal(_decode(vae, z), _decode_module(module, z))


def test_pickle_and_broken_files_are_refused_with_a_clear_error(tmp_path):
    (tmp_path / "vae.ckpt").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(VAELoadError, match="pickle-based files are never loaded"):
        load_vae(tmp_path / "vae.ckpt")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}xxxxxxx")
    with pytest.raises(VAELoadError, match=r"broken\.safetensors.*corrupt"):
        load_vae(tmp_path / "broken.safetensors")
    save_file({"something.else": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(VAELoadError, match="no AutoencoderKL"):
        load_vae(tmp_path / "other.safetensors")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(VAELoadError, match=r"pickle \.bin files are refused"):
        load_vae(folder)
    with pytest.raises(VAELoadError, match="no such file"):
        load_vae(tmp_path / "missing.safetensors")


def test_truncated_weights_name_the_missing_part(tmp_path):
    module = tiny_autoencoder(4, seed=5)
    state = {
        k: v.contiguous() for k, v in module.state_dict().items() if not k.startswith("decoder.conv_out")
    }
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(VAELoadError, match=r"partial\.safetensors"):
        load_vae(tmp_path / "partial.safetensors")


def test_precision_change_and_shipped_configs():
    from lib_vaebatch.backends.diffusers_vae import family_config

    for fam, channels in (("sd1", 4), ("sd2", 4), ("sdxl", 4), ("sd3", 16), ("flux", 16)):
        cfg = family_config(fam)
        assert cfg["latent_channels"] == channels and cfg["block_out_channels"] == [128, 256, 512, 512]
    assert family_config("flux")["use_quant_conv"] is False
