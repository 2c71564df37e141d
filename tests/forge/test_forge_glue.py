"""The "VAE Batch" script on the Forge family, through fake hosts of both backends (conftest):
detection by capability, the decode takeover equal to Forge's own decode with Forge's decode left
unused (hires fix included), loading through Forge's memory manager, UNet NaN left to the host,
VAE NaN recovered, the out-of-memory ladder (our exact tiles; Forge's 3-pass tiles only as the
very last rung, labelled), the hand-back guard, interrupt, keep-recovered-precision."""

from __future__ import annotations

import pytest
import torch

from tests.forge import threepass
from tests.forge.hosts import build_model
from tests.support import cpu_runs_fp16

ON = {"VAE Batch": {"args": [True]}}


def _stack(processed):
    return torch.stack(processed.images)


def _vae_calls(forge):
    import importlib

    mod = "backend.patcher.vae" if forge.variant.backend == "new" else "ldm_patched.modules.sd"
    return importlib.import_module(mod).calls


def test_the_variant_and_its_backend_are_detected_by_capability(forge):
    from lib_vaebatch.forge.detect import MEMORY_MANAGER, detect_host, is_forge_model

    host = detect_host()
    assert host is not None and host.backend == forge.variant.backend
    assert host.label == forge.variant.label
    assert host.memory_manager().__name__ == MEMORY_MANAGER[forge.variant.backend]
    assert is_forge_model(forge.shared.sd_model)
    # The label is only a label: an unknown version string still gets the right adapter.
    from modules_forge import forge_version

    forge_version.version = "9.9-someday"
    assert detect_host().backend == forge.variant.backend


def test_a1111_is_not_taken_for_forge(webui):
    from lib_vaebatch.forge.detect import detect_host, is_forge_model

    assert detect_host() is None
    assert not is_forge_model(webui.shared.sd_model)


@pytest.mark.parametrize("hires", [None, "Latent", "Lanczos"])
def test_takeover_matches_forge_and_forge_decode_is_not_used(forge, hires):
    kw = {"batch_size": 2, "enable_hr": hires is not None, "hr_upscaler": hires or "Latent"}
    _, core = forge.run(**kw)
    assert forge.processing.core_decode_calls and "decode" in _vae_calls(forge)
    forge.processing.core_decode_calls.clear()
    _vae_calls(forge).clear()
    forge.mm.calls.clear()
    _, ours = forge.run(alwayson=ON, **kw)
    assert forge.processing.core_decode_calls == [], "every decode goes through the engine"
    assert "decode" not in _vae_calls(forge) and "tiled" not in _vae_calls(forge)
    # Within 2 levels of 8-bit: here (fp32) within rounding.
    assert (_stack(ours) - _stack(core)).abs().max().item() <= 1e-5
    assert all("VAE Batch: on" in t for t in ours.infotexts), ours.infotexts
    assert forge.processing.decode_latent_batch is forge.original_decode
    # Loaded through Forge's memory manager with a request sized by our planner, cache released.
    from lib_vaebatch.engine.planner import estimate_bytes

    loads = [c for c in forge.mm.calls if c[0] == "load"]
    vae = forge.shared.sd_model.forge_objects.vae
    assert loads and all(c[1] == [vae.patcher] for c in loads)
    from lib_vaebatch.forge.host import backend_for

    backend = backend_for(forge.shared.sd_model)
    size = ours.images[0].shape[-1] * ours.images[0].shape[-2]
    assert loads[-1][2] == estimate_bytes(backend, "decode", size, torch.float32) + backend.fixed_bytes(
        "decode"
    )
    assert ("empty",) in forge.mm.calls


def test_chunks_and_tiles_follow_forge_free_memory(forge):
    """The planner reads free memory from Forge's manager: with little of it, images that would
    fit the machine's RAM are decoded in (exact) tiles."""
    _, core = forge.run(batch_size=2, width=128, height=128)
    forge.mm.free_bytes = 24 << 20
    _, ours = forge.run(alwayson=ON, batch_size=2, width=128, height=128)
    assert all("VAE Batch: tiled ×2" in t for t in ours.infotexts), ours.infotexts
    assert (_stack(ours) - _stack(core)).abs().max().item() <= 1e-4
    assert "tiled" not in _vae_calls(forge), "Forge's own tiling is never used"


def test_unet_nan_is_left_to_forge(forge, capsys):
    _, res = forge.run(alwayson=ON, unet_nan=(0, 1, 2, 3, 3), batch_size=2)
    assert forge.processing.core_decode_calls == [2], "Forge decodes it, its own way"
    assert not any("VAE Batch:" in t for t in res.infotexts), "not claimed as ours"
    assert "UNet output holds NaN/Inf" in capsys.readouterr().out
    # Hires first pass: Forge has no NansException to raise; the host's decode runs.
    forge.processing.core_decode_calls.clear()
    forge.run(alwayson=ON, unet_nan=(0, 1, 2, 3, 3), batch_size=2, enable_hr=True, hr_upscaler="Lanczos")
    assert forge.processing.core_decode_calls[0] == 2
    assert forge.processing.decode_latent_batch is forge.original_decode


@pytest.mark.parametrize("stored", ["fp16", "bf16"])
def test_vae_overflow_is_recovered_where_forge_gives_nan(forge, capsys, stored):
    """A VAE Forge built in fp16 (``--vae-in-fp16``) or bf16 (its default on Ampere+ GPUs) whose
    activations overflow there: Forge alone gives NaN (black), the script real images."""
    if stored == "fp16" and not cpu_runs_fp16():
        pytest.skip("this torch has no fp16 convolution on the CPU (torch 2.1); the bf16 case runs")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[stored]
    forge.shared.sd_model = build_model(forge.variant, overflow=stored, dtype=dtype)
    vae = forge.shared.sd_model.forge_objects.vae
    _, core = forge.run(batch_size=2)
    # What those same weights give computed in fp32 (Forge itself, the module cast up).
    vae.first_stage_model.to(torch.float32)
    vae.vae_dtype = torch.float32
    _, fp32 = forge.run(batch_size=2)
    vae.first_stage_model.to(dtype)
    vae.vae_dtype = dtype
    ref = _stack(fp32)
    assert torch.isfinite(ref).all() and ref.std() > 0.01
    if stored == "fp16":
        assert not torch.isfinite(_stack(core)).all(), "Forge alone: NaN (black images)"
    # (The bf16 fake overflows in one value of the last conv, which Forge's clamp hides; the
    # engine sees the Inf before any clamp.)
    _, ours = forge.run(alwayson=ON, batch_size=2)
    # Neo has no auto_vae_precision: our ladder (bf16, then fp32); the others follow their settings
    # (fp32). The first image is recovered; the rest of the job then runs in that precision.
    rung = "bf16" if forge.variant.name == "neo" and stored == "fp16" else "fp32"
    tolerance = 1e-4 if rung == "fp32" else 0.02  # bf16 compute, where Neo's ladder stops
    assert (_stack(ours) - ref).abs().max().item() <= tolerance, "the fp32 result over the same weights"
    text = ours.infotexts[0]
    note = f"{rung} compute over the {stored} weights Forge loaded"
    from lib_vaebatch.infotext import parse_params

    assert parse_params(text.splitlines()[-1])["VAE Batch"] == f"recovered {rung} ×1, {note}", text
    assert note in capsys.readouterr().out
    assert next(vae.first_stage_model.parameters()).dtype == dtype and vae.vae_dtype == dtype
    # "Keep recovered precision": Forge's own vae_dtype follows, so its later decodes use it.
    keep = [True, 0, True, "webui settings", True]
    forge.run(alwayson={"VAE Batch": {"args": keep}}, batch_size=1)
    assert vae.vae_dtype == next(vae.first_stage_model.parameters()).dtype != dtype


def _oom_unless(predicate):
    def hook(module, args):
        if not predicate(args[0]):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    return hook


def test_out_of_memory_goes_to_our_exact_tiles_not_forge(forge, capsys):
    _, core = forge.run(batch_size=2, width=128, height=128)
    decoder = forge.shared.sd_model.forge_objects.vae.first_stage_model.decoder
    # Whole images do not fit; 64x64-pixel tiles (8x8 latents) do.
    handle = decoder.conv_in.register_forward_pre_hook(
        _oom_unless(lambda x: x.shape[-1] * x.shape[-2] <= 12 * 12)
    )
    try:
        _, ours = forge.run(alwayson=ON, batch_size=2, width=128, height=128)
    finally:
        handle.remove()
    assert "tiled" not in _vae_calls(forge), "Forge's 3-pass tiling is not used"
    assert all("VAE Batch: tiled ×2" in t for t in ours.infotexts), ours.infotexts
    assert (_stack(ours) - _stack(core)).abs().max().item() <= 1e-4, "exact tiles"
    assert "continues in tiles" in capsys.readouterr().out


def test_forge_tiles_only_after_our_whole_ladder_failed_and_labelled(forge_pair, capsys):
    forge = forge_pair
    forge.run(batch_size=2)  # the checkpoint loaded and a plain run done, as before a real job
    decoder = forge.shared.sd_model.forge_objects.vae.first_stage_model.decoder
    handle = decoder.conv_in.register_forward_pre_hook(_oom_unless(lambda x: threepass.ACTIVE))
    threepass.OUTPUTS.clear()
    try:
        _, ours = forge.run(alwayson=ON, batch_size=2)
    finally:
        handle.remove()
    assert _vae_calls(forge).count("tiled") == 2, "one Forge tiled decode per failed image"
    assert all("VAE Batch: Forge 3-pass tiles ×2" in t for t in ours.infotexts), ours.infotexts
    out = capsys.readouterr().out
    assert "even in our smallest tiles" in out and "Forge's own 3-pass tiles (approximate)" in out
    # each image is Forge's own 3-pass decode of its latent, as that produced it (an 8x8 latent
    # fits in one of its 64-pixel tiles, so here it also equals the untiled decode up to rounding)
    assert len(threepass.OUTPUTS) == 2 and all(o.shape[0] == 1 for o in threepass.OUTPUTS)
    assert (_stack(ours) - torch.cat(threepass.OUTPUTS)).abs().max().item() <= 1e-6


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda vae: setattr(vae, "latent_channels", 32), "32 latent channels"),
        (lambda vae: setattr(vae, "is_flux2", True), "Flux.2"),
        (lambda vae: setattr(vae, "upscale_ratio", 16), "scales by 16"),
        (lambda vae: setattr(vae, "is_wan", True), "Wan"),
    ],
)
def test_what_the_engine_does_not_drive_goes_back_to_forge_with_one_line(forge_pair, capsys, change, why):
    forge = forge_pair
    change(forge.shared.sd_model.forge_objects.vae)
    forge.processing.core_decode_calls.clear()
    _, res = forge.run(alwayson=ON, batch_size=2)
    assert forge.processing.core_decode_calls == [2], "Forge's own decode ran"
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[VAE Batch]")]
    assert len(lines) == 1 and why in lines[0] and forge.variant.label in lines[0], lines
    assert all("VAE Batch: left to the webui" in t for t in res.infotexts)


def test_guard_reasons_for_video_latents_and_foreign_modules(forge_pair):
    from lib_vaebatch.forge.host import backend_for

    model = forge_pair.shared.sd_model
    backend = backend_for(model)
    assert backend.hand_back_reason(torch.zeros(1, 4, 8, 8)) is None
    assert "5-D" in backend.hand_back_reason(torch.zeros(1, 16, 2, 8, 8))
    assert "channels" in backend.hand_back_reason(torch.zeros(1, 16, 8, 8))

    class TAESD(torch.nn.Module):
        pass

    model.forge_objects.vae.first_stage_model = TAESD()
    assert "TAESD" in backend_for(model).hand_back_reason(torch.zeros(1, 4, 8, 8))


def test_interrupt_during_the_decode_keeps_the_finished_images(forge):
    _, core = forge.run(batch_size=3)
    module = forge.shared.sd_model.forge_objects.vae.first_stage_model
    decode = module.decode

    def decode_then_interrupt(z):
        out = decode(z)
        forge.shared.state.interrupt()
        return out

    module.decode = decode_then_interrupt
    try:
        _, ours = forge.run(alwayson=ON, batch_size=3)
    finally:
        del module.decode
    assert len(ours.images) == 1
    assert (ours.images[0] - core.images[0]).abs().max().item() <= 1e-5
    assert any(t.startswith("VAE Batch: decoding 1/3") for t in forge.shared.state.textinfo_log)


def test_img2img_decode_and_deterministic_init_encode(forge):
    init = torch.rand(3, 64, 64)
    forge.shared.opts.data["vaebatch_img2img_encode"] = True
    p1, a = forge.run("img2img", alwayson=ON, init_images=[init], batch_size=2)
    p2, b = forge.run("img2img", alwayson=ON, init_images=[init], batch_size=2)
    assert "encode" not in _vae_calls(forge), "Forge's (sampling) encode is not used"
    assert torch.equal(p1.init_latent, p2.init_latent), "posterior mean: deterministic"
    assert torch.equal(_stack(a), _stack(b))
    assert all("VAE Batch: on" in t for t in a.infotexts)
    # Same latents as Forge's scaling of the posterior mean.
    module = forge.shared.sd_model.forge_objects.vae.first_stage_model
    mean = module.encode_moments(init[None] * 2 - 1).chunk(2, dim=1)[0]
    from lib_vaebatch.forge.host import backend_for

    backend = backend_for(forge.shared.sd_model)
    expected = (mean - backend.shift_factor) * backend.scaling_factor
    assert (p1.init_latent[0] - expected[0]).abs().max().item() <= 1e-5


def test_api_arguments_are_the_same_as_on_a1111(forge):
    from lib_vaebatch.webui import args as A

    script = forge.runners["txt2img"].alwayson_scripts[0]
    assert [a["label"] for a in script.api_info["args"]] == [a.label for a in A.ARGS]
    _, res = forge.run(
        alwayson={"VAE Batch": {"args": [True, 2, True, "fp32", False, "cpu", "always", "exact", 8]}}
    )
    text = res.infotexts[0]
    assert "VAE Batch ladder: fp32" in text and "VAE Batch tiling: always" in text and "tiled ×1" in text
    # bad arguments: Forge's own decode, and the infotext (the API's info) says why VAE Batch was off
    _, res = forge.run(alwayson={"VAE Batch": {"args": [True, "abc"]}})
    from lib_vaebatch.infotext import parse_params

    said = parse_params(res.infotexts[0].splitlines()[-1])["VAE Batch"]
    assert said == "off (Max chunk (0 = auto): expected a whole number, not 'abc')"
