"""The Forge adapters one call at a time (lib_vaebatch/forge/adapters.py), on the fake hosts of
both backends: every reason a decode is handed back (the exact line the user reads), the
scaling each backend reads and its defaults, the memory manager asked about the VAE's own device,
VAE files read without unpickling (safetensors, ``.pt``/``.ckpt`` with and without a
``state_dict`` wrapper, diffusers naming) and loaded strictly in the checkpoint VAE's dtype.

Written from the mutation run of ``./dev.sh mutate lib_vaebatch/forge/adapters.py`` (docs/mutation.md):
each test here kills mutants that the end-to-end glue tests left alive."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.forge.hosts import ldm_state


def _adapter():
    from lib_vaebatch.forge.adapters import adapter_for
    from lib_vaebatch.forge.detect import detect_host

    return adapter_for(detect_host())


def _module(forge, dtype=torch.float32):
    """A module of the class the variant's engine drives, in ``dtype``."""
    module = forge.shared.sd_model.forge_objects.vae.first_stage_model
    return module.to(dtype)


def _vae(module, **kw):
    base = {"latent_channels": 4, "first_stage_model": module}
    return SimpleNamespace(**{**base, **kw})


Z4 = torch.zeros(1, 4, 8, 8)


def test_every_hand_back_reason_is_the_line_the_user_reads(forge_pair):
    forge = forge_pair
    a, model = _adapter(), forge.shared.sd_model
    module = _module(forge)
    assert a.hand_back_reason(model, _vae(module), Z4) is None
    # 16 latent channels (SD3/Flux.1) are the engine's too, with 16-channel latents
    assert a.hand_back_reason(model, _vae(module, latent_channels=16), torch.zeros(1, 16, 8, 8)) is None
    cases = [
        (_vae(module), torch.zeros(1, 4, 2, 8, 8), "the latents are 5-D (a video VAE)"),
        (_vae(module, is_wan=True), Z4, "this is a Wan (video) VAE"),
        (_vae(module, is_flux2=True), Z4, "this is a Flux.2 VAE"),
        (_vae(module, is_mugen=True), Z4, "this is a Mugen VAE"),
        (_vae(module, upscale_ratio=16), Z4, "the VAE scales by 16, not 8"),
        # Forge's VAE class names it downscale_ratio; upscale_ratio (ComfyUI's) wins when both are there
        (_vae(module, downscale_ratio=16), Z4, "the VAE scales by 16, not 8"),
        (_vae(module, latent_channels=17), torch.zeros(1, 17, 8, 8), "the VAE has 17 latent channels"),
        (_vae(module, latent_channels=32), torch.zeros(1, 32, 8, 8), "the VAE has 32 latent channels"),
        (SimpleNamespace(first_stage_model=module), Z4, "the VAE has None latent channels"),
        (
            _vae(module, latent_channels=16),
            torch.zeros(1, 64, 8, 8),
            "the latents have 64 channels for a 16-channel VAE (packed)",
        ),
        (SimpleNamespace(latent_channels=4), Z4, "its VAE module is a NoneType"),
    ]
    for vae, latents, why in cases:
        assert a.hand_back_reason(model, vae, latents) == why, why
    assert a.hand_back_reason(model, _vae(module, upscale_ratio=8, downscale_ratio=16), Z4) is None


def test_a_wan_model_goes_back_even_when_its_vae_says_nothing(forge_pair):
    a, model = _adapter(), forge_pair.shared.sd_model
    vae = _vae(_module(forge_pair))
    model.is_wan = True
    assert a.hand_back_reason(model, vae, Z4) == "this is a Wan (video) VAE"


def test_weights_the_engine_cannot_run_go_back_with_their_dtype(forge_pair):
    a, model = _adapter(), forge_pair.shared.sd_model
    kind = type(_module(forge_pair))
    assert a.hand_back_reason(model, _vae(_module(forge_pair, torch.float64)), Z4) == (
        "its VAE weights are torch.float64"
    )
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert a.hand_back_reason(model, _vae(_module(forge_pair, dtype)), Z4) is None
    # the engine's class with no weights at all, and an object of that class name that is no module
    empty = kind.__new__(kind)
    torch.nn.Module.__init__(empty)
    assert a.hand_back_reason(model, _vae(empty), Z4) == "its VAE weights are missing"
    impostor = type(kind.__name__, (), {"parameters": lambda self: iter([torch.zeros(1)])})()
    assert a.hand_back_reason(model, _vae(impostor), Z4) == "its VAE weights are missing"


def test_the_memory_manager_is_asked_about_the_vaes_own_device(forge_pair, monkeypatch):
    a = _adapter()
    asked = []
    monkeypatch.setattr(a.mm, "get_free_memory", lambda dev=None, **kw: asked.append(dev) or 123.9)
    vae = SimpleNamespace(device=torch.device("cpu"))
    assert a.free_bytes(vae) == 123 and asked == [torch.device("cpu")]


def test_a_memory_manager_without_soft_empty_cache_is_fine(forge_pair, monkeypatch):
    a = _adapter()
    a.empty_cache()
    assert a.mm.calls[-1] == ("empty",)
    a.mm = SimpleNamespace()  # a variant without the call: nothing to release, no error
    a.empty_cache()


def test_new_backend_scaling_reads_the_module_and_defaults_to_sd1(forge):
    if forge.variant.backend != "new":
        pytest.skip("the old backend reads the UNet's latent format (next test)")
    a, model = _adapter(), forge.shared.sd_model
    flux = SimpleNamespace(first_stage_model=SimpleNamespace(scaling_factor=0.3611, shift_factor=0.1159))
    assert a.scaling(model, flux) == (0.3611, 0.1159)
    assert a.scaling(model, SimpleNamespace(first_stage_model=SimpleNamespace())) == (0.18215, 0.0)
    none = SimpleNamespace(first_stage_model=SimpleNamespace(scaling_factor=0.13025, shift_factor=None))
    assert a.scaling(model, none) == (0.13025, 0.0)


def test_old_backend_scaling_reads_the_latent_format_shift_too(forge):
    if forge.variant.backend != "old":
        pytest.skip("the new backend reads the module (previous test)")
    a, model = _adapter(), forge.shared.sd_model
    fmt = model.forge_objects.unet.model.model_config.latent_format
    assert a.scaling(model, None) == (fmt.scale_factor, 0.0)
    fmt.scale_factor, fmt.shift_factor = 0.3611, 0.1159  # Flux.1's latent format
    assert a.scaling(model, None) == (0.3611, 0.1159)
    fmt.shift_factor = None
    assert a.scaling(model, None) == (0.3611, 0.0)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_vae_files_are_read_without_unpickling_in_each_container(tmp_path):
    from safetensors.torch import save_file

    from lib_vaebatch.forge.adapters import read_vae_state

    state = ldm_state(3)
    save_file({f"first_stage_model.{k}": v for k, v in state.items()}, tmp_path / "a.safetensors")
    torch.save({"state_dict": {f"first_stage_model.{k}": v for k, v in state.items()}}, tmp_path / "b.ckpt")
    torch.save(state, tmp_path / "c.pt")
    for name in ("a.safetensors", "b.ckpt", "c.pt"):
        got = read_vae_state(tmp_path / name)
        assert _same(got, state), name
        assert all(t.device.type == "cpu" for t in got.values())
    torch.save([state], tmp_path / "d.pt")
    with pytest.raises(ValueError, match=r"^d\.pt: no state dict inside$"):
        read_vae_state(tmp_path / "d.pt")


def test_a_vae_file_loads_with_its_own_weights_in_either_naming(tmp_path, forge_pair):
    """Both backends: the file's weights (ldm or diffusers naming) in a VAE the memory manager
    moves, in the dtype the checkpoint's VAE runs in."""
    from safetensors.torch import save_file

    from lib_vaebatch.backends.keys import ldm_to_diffusers
    from lib_vaebatch.forge.host import vae_from_file

    model = forge_pair.shared.sd_model
    state = ldm_state(5)
    save_file(state, tmp_path / "ldm.safetensors")
    save_file(ldm_to_diffusers(state), tmp_path / "diffusers.safetensors")
    for name in ("ldm.safetensors", "diffusers.safetensors"):
        vae = vae_from_file(model, tmp_path / name)
        got = vae.first_stage_model.state_dict()
        assert all(torch.equal(got[k].float(), v) for k, v in state.items()), name
        assert vae.patcher is not None and vae.vae_dtype == model.forge_objects.vae.vae_dtype


def test_new_backend_loads_a_vae_file_strictly_in_the_checkpoint_vaes_dtype(tmp_path, forge):
    """Forge 2 / Neo: the file goes into a copy of the checkpoint's own module, so a file that
    does not fit it is refused (not half-loaded), and a bf16 checkpoint's VAE file runs in bf16.
    (The old backend builds the VAE with its own class, which loads leniently and prints the
    missing keys, in the memory manager's VAE dtype: the host's behaviour, left as it is.)"""
    if forge.variant.backend != "new":
        pytest.skip("the old backend's own VAE class loads the file")
    from safetensors.torch import save_file

    from lib_vaebatch.forge.host import vae_from_file
    from tests.forge.hosts import build_model

    state = ldm_state(5)
    save_file({**state, "decoder.extra.weight": torch.zeros(1)}, tmp_path / "extra.safetensors")
    with pytest.raises(RuntimeError, match=r"decoder\.extra\.weight"):
        vae_from_file(forge.shared.sd_model, tmp_path / "extra.safetensors")
    model = build_model(forge.variant, dtype=torch.bfloat16)
    save_file(state, tmp_path / "v.safetensors")
    vae = vae_from_file(model, tmp_path / "v.safetensors")
    assert vae.vae_dtype == torch.bfloat16
    assert next(vae.first_stage_model.parameters()).dtype == torch.bfloat16
