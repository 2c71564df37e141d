"""The "VAE Batch" script in a fake webui kept faithful to webui-reference.md: hooks, decode
takeover with and without hires fix, scoped patching, NaN handling, interrupt, infotext, settings,
API argument mapping, the Forge path."""

from __future__ import annotations

import threading

import pytest
import torch

from lib_vaebatch.devices import dtype_name
from lib_vaebatch.latents import read_latents
from tests.support import needs_fp16_cpu, record_tile_settings

ON = {"VAE Batch": {"args": [True]}}


def _stack(processed):
    return torch.stack(processed.images)


def _close(a, b, tol=1e-5):
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= tol


def test_one_script_registered_with_every_argument_described(webui):
    from lib_vaebatch.webui import args as A

    classes = [d.script_class.__name__ for d in webui.scripts.scripts_data]
    assert classes == ["VaeBatchScript"], "the base Script class must not be registered too"
    script = webui.runners["txt2img"].alwayson_scripts[0]
    assert script.title() == "VAE Batch" and script.section == "accordions"
    info = script.api_info
    assert info["name"] == "vae batch" and info["is_alwayson"]
    assert [a["label"] for a in info["args"]] == [a.label for a in A.ARGS]
    assert [a["value"] for a in info["args"]] == [a.default for a in A.ARGS]
    tiling = info["args"][[a.name for a in A.ARGS].index("tiling")]
    assert tiling["choices"] and "always" in str(tiling["choices"])
    ids = [c.elem_id for c in webui.runners["img2img"].inputs[script.args_from : script.args_to]]
    assert ids[0] == "script_img2img_vae_batch_enabled-checkbox"
    assert ids[1:] == [f"script_img2img_vae_batch_{a.name}" for a in A.ARGS[1:]]


@pytest.mark.parametrize("hires", [None, "Latent", "Lanczos"])
def test_takeover_matches_the_webui_decode_and_the_webui_decode_is_not_used(webui, hires):
    kw = {"batch_size": 2, "enable_hr": hires is not None, "hr_upscaler": hires or "Latent"}
    _, core = webui.run(**kw)
    core_calls = list(webui.processing.core_decode_calls)
    assert core_calls, "without the script the webui decodes"
    webui.processing.core_decode_calls.clear()
    p, ours = webui.run(alwayson=ON, **kw)
    assert webui.processing.core_decode_calls == [], (
        "with the script on, every decode goes through the engine"
    )
    _close(_stack(ours), _stack(core))
    assert all("VAE Batch: on" in t for t in ours.infotexts)
    assert not any("VAE Batch" in t for t in core.infotexts)
    assert webui.processing.decode_latent_batch is webui.original_decode, "patch lives only during the job"
    assert "sample" not in p.__dict__
    assert webui.scripts.errors == []


def test_patch_is_restored_after_an_exception_mid_job_and_others_see_the_original(webui):
    seen_by_other_thread = []

    def second_pass_fails(self, samples, decoded, *a):
        # While our job runs: another thread's decode goes to the webui's own function.
        t = threading.Thread(
            target=lambda: seen_by_other_thread.append(
                webui.processing.decode_latent_batch(self.sd_model, samples[:1])
            )
        )
        t.start()
        t.join()
        assert webui.processing.decode_latent_batch is not webui.original_decode  # ours is installed
        raise RuntimeError("sampler crashed in the second pass")

    cls = webui.processing.StableDiffusionProcessingTxt2Img
    original = cls.sample_hr_pass
    cls.sample_hr_pass = second_pass_fails
    try:
        with pytest.raises(RuntimeError, match="second pass"):
            webui.run(alwayson=ON, enable_hr=True, hr_upscaler="Lanczos")
    finally:
        cls.sample_hr_pass = original
    assert webui.processing.decode_latent_batch is webui.original_decode
    assert len(seen_by_other_thread) == 1 and webui.processing.core_decode_calls == [1]


def test_unet_nan_anywhere_is_left_to_the_webui_check(webui, capsys):
    # NaN at the first element: the webui's own check raises its own message.
    from modules import devices

    with pytest.raises(devices.NansException, match="produced in Unet"):
        webui.run(alwayson=ON, unet_nan=(0, 0, 0, 0, 0), batch_size=2, seed=1)
    assert webui.processing.core_decode_calls == []
    # Not where the webui looks: we still stand aside; the webui decodes the latents as they are
    # (the NaN spreads through its VAE, so its own VAE check raises).
    with pytest.raises(devices.NansException, match="produced in VAE"):
        webui.run(alwayson=ON, unet_nan=(0, 1, 2, 3, 3), batch_size=2)
    assert webui.processing.core_decode_calls == [2]
    assert "UNet output holds NaN/Inf" in capsys.readouterr().out


def test_unet_nan_in_the_hires_first_pass_raises_the_webui_exception(webui):
    from modules import devices

    with pytest.raises(devices.NansException, match="A tensor with NaNs was produced in Unet"):
        webui.run(alwayson=ON, unet_nan=(0, 1, 2, 3, 3), batch_size=2, enable_hr=True, hr_upscaler="Lanczos")
    assert webui.processing.decode_latent_batch is webui.original_decode


@pytest.mark.parametrize(
    "precision",
    [pytest.param(torch.float16, marks=needs_fp16_cpu, id="fp16"), pytest.param(torch.bfloat16, id="bf16")],
)
def test_vae_nan_is_recovered_for_the_job_and_the_precision_restored(webui, precision):
    sd = webui.shared
    vae = webui.models.ldm_vae(overflow=dtype_name(precision))
    with torch.no_grad():
        assert not torch.isfinite(vae.to(precision).decode(torch.randn(1, 4, 8, 8, dtype=precision))).all()
    vae.decode_calls.clear()
    sd.sd_model = webui.models.LatentDiffusion(vae)
    webui.devices.dtype_vae = precision
    _, res = webui.run(alwayson=ON, batch_size=2)
    images = _stack(res)
    assert torch.isfinite(images).all()
    assert all("VAE Batch: recovered fp32" in t for t in res.infotexts), res.infotexts
    assert sd.sd_model.first_stage_model.dtype == precision, "restored after the job"
    assert webui.devices.dtype_vae == precision
    # The setting "keep recovered precision" makes it stick, and devices.dtype_vae follows.
    keep = [True, 0, True, "webui settings", True]
    _, res = webui.run(alwayson={"VAE Batch": {"args": keep}}, batch_size=1)
    assert sd.sd_model.first_stage_model.dtype == torch.float32
    assert webui.devices.dtype_vae == torch.float32


def test_interrupt_during_the_decode_keeps_the_finished_images(webui):
    _, core = webui.run(batch_size=3)
    vae = webui.shared.sd_model.first_stage_model
    decode = vae.decode

    def decode_then_interrupt(z):
        out = decode(z)
        webui.shared.state.interrupt()  # pressed while image 1 decodes
        return out

    vae.decode = decode_then_interrupt
    try:
        _, ours = webui.run(alwayson=ON, batch_size=3)
    finally:
        del vae.decode
    assert len(ours.images) == 1
    _close(ours.images[0], core.images[0])
    assert webui.shared.state.textinfo_log[0] == "VAE Batch: decoding 0/3"
    assert any(t.startswith("VAE Batch: decoding 1/3") for t in webui.shared.state.textinfo_log)


@pytest.mark.parametrize("tile_mode", ["fast", "exact-lean"])
def test_infotext_options_and_paste_restore_the_values(webui, monkeypatch, tile_mode):
    from lib_vaebatch.webui import args as A

    values = [True, 2, True, "fp32", False, "cpu", "always", tile_mode, 16, False, "webui"]
    seen = record_tile_settings(monkeypatch)
    _, res = webui.run(alwayson={"VAE Batch": {"args": values}}, batch_size=2)
    text = res.infotexts[0]
    for key in ("VAE Batch: ", "VAE Batch ladder: fp32", "VAE Batch tiling: always",
                f"VAE Batch tile mode: {tile_mode}", "VAE Batch tile size: 16"):  # fmt: skip
        assert key in text, text
    assert "tiled ×2" in text
    assert seen and all(t.mode == tile_mode for t in seen), seen
    assert tile_mode != "exact-lean" or all(t.spill is None for t in seen), "exact-lean never spills"
    params = dict(kv.split(": ", 1) for kv in text.splitlines()[-1].split(", ") if ": " in kv)
    script = webui.runners["txt2img"].alwayson_scripts[0]
    pasted = [fn(params) for _component, fn in script.infotext_fields]
    expect = dict(zip([a.name for a in A.ARGS], values, strict=True))
    expect["chunk"] = A.BY_NAME["chunk"].default  # does not change the output: not in the infotext
    assert pasted == [expect[a.name] for a in A.ARGS]
    assert script.infotext_fields[0][1]({}) is False


def test_settings_section_holds_the_defaults_and_feeds_the_ui_and_api(webui):
    from lib_vaebatch.webui import args as A

    labels = webui.shared.opts.data_labels
    for arg in A.ARGS + A.EXTRA_SETTINGS:
        assert labels[arg.setting_key].section == A.SECTION
    webui.shared.opts.vaebatch_enabled = True
    webui.shared.opts.vaebatch_tiling = "always"
    runner = webui.scripts.ScriptRunner(False)
    runner.initialize_scripts()
    runner.setup_ui()
    script = runner.alwayson_scripts[0]
    api_defaults = webui.api.init_default_script_args(runner)[script.args_from : script.args_to]
    assert api_defaults[0] is True
    assert api_defaults[[a.name for a in A.ARGS].index("tiling")] == "always"


def test_api_argument_mapping_title_match_and_bad_values(webui, capsys):
    _, res = webui.run(alwayson={"vae batch": {"args": [True]}})
    assert "VAE Batch: on" in res.infotexts[0]
    with pytest.raises(webui.api.HTTPError, match="422"):
        webui.run(alwayson={"VAE Batchh": {"args": [True]}})
    webui.processing.core_decode_calls.clear()
    _, res = webui.run(
        alwayson={"VAE Batch": {"args": [True, 0, True, "webui settings", False, "cpu", "sideways"]}}
    )
    out = capsys.readouterr().out
    assert "[VAE Batch]" in out and "sideways" in out and "off for this generation" in out
    assert len(res.images) == 1 and webui.processing.core_decode_calls == [1]
    why = "off (Tiled decode: 'sideways' is not one of auto, always, never)"
    assert A_params(res.infotexts[0])["VAE Batch"] == why


@pytest.mark.parametrize(
    ("args", "why"),
    [
        ([True, "abc"], "off (Max chunk (0 = auto): expected a whole number, not 'abc')"),
        ([True, -3], "off (Max chunk (0 = auto): -3 is outside 0..64)"),
        ([True, 0, True, "webui settings", False, "cpu", "auto", "exact", 10**9], "off (Tile size"),
        ([True, 0, True, "sometimes"], "off (Recovery precisions: 'sometimes' is not one of"),
        (["maybe"], "off (VAE Batch: expected true or false, not 'maybe')"),
    ],
)
def test_bad_api_arguments_say_in_the_infotext_that_vae_batch_was_off_and_why(webui, args, why):
    """An API caller sees it in ``info``: the infotext says VAE Batch was off, and why."""
    from lib_vaebatch.webui import args as A

    webui.processing.core_decode_calls.clear()
    _, res = webui.run(alwayson={"VAE Batch": {"args": args}})
    assert webui.processing.core_decode_calls == [1], "the webui's own decode ran"
    params = A_params(res.infotexts[0])
    assert params[A.TITLE].startswith(why), params[A.TITLE]


def test_arguments_that_do_not_ask_for_vae_batch_leave_no_trace(webui):
    _, res = webui.run(alwayson={"VAE Batch": {"args": [False, "abc"]}})
    assert "VAE Batch" not in res.infotexts[0]


def A_params(infotext: str) -> dict[str, str]:
    """The parameters of an infotext's last line, read as the webui's PNG Info reads them."""
    from lib_vaebatch.infotext import parse_params

    return parse_params(infotext.splitlines()[-1])


def test_a_model_without_first_stage_outside_forge_is_left_alone_with_one_message(webui, capsys):
    webui.shared.sd_model = webui.models.ForgeModel(webui.models.ldm_vae())
    _, res = webui.run(alwayson=ON, batch_size=2)
    out = capsys.readouterr().out
    assert out.count("[VAE Batch]") == 1 and "Forge" in out
    assert "Traceback" not in out and webui.scripts.errors == []
    assert len(res.images) == 2 and not any("VAE Batch" in t for t in res.infotexts)


def test_reload_ui_restores_the_patch_and_does_not_double_callbacks(webui):
    from lib_vaebatch.webui import takeover as T

    job = T.Job(values={}, p=None)
    cm = T.DECODE.active(job)
    cm.__enter__()  # a job cut off mid-way (as if its thread died)
    assert webui.processing.decode_latent_batch is not webui.original_decode
    webui.callbacks.script_unloaded_callback()
    assert webui.processing.decode_latent_batch is webui.original_decode
    webui.scripts.load_scripts(str(webui.api.__file__).rsplit("/tests/", 1)[0])
    webui.scripts.load_scripts(str(webui.api.__file__).rsplit("/tests/", 1)[0])
    counts = {k: len(v) for k, v in webui.callbacks.callback_map.items()}
    assert counts["callbacks_script_unloaded"] == 1 and counts["callbacks_ui_settings"] == 1


def test_img2img_decode_and_optional_init_encode(webui):
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(3))
    webui.processing.core_decode_calls.clear()
    _, ours = webui.run("img2img", alwayson=ON, init_images=[image], batch_size=2)
    assert webui.processing.core_decode_calls == [] and len(ours.images) == 2
    assert "VAE Batch: on" in ours.infotexts[0]
    # The setting routes the init-image encode through the engine: posterior mean, so repeatable.
    webui.shared.opts.vaebatch_img2img_encode = True
    p1, _ = webui.run("img2img", alwayson=ON, init_images=[image])
    p2, _ = webui.run("img2img", alwayson=ON, init_images=[image])
    _close(p1.init_latent, p2.init_latent, 0.0)
    vae, scale = webui.shared.sd_model.first_stage_model, webui.shared.sd_model.scale_factor
    mean = vae.encode(image[None] * 2 - 1).mean * scale
    _close(p1.init_latent.float(), mean, 1e-5)
    assert webui.processing.images_tensor_to_samples.__name__ == "images_tensor_to_samples"
    assert not getattr(webui.processing.images_tensor_to_samples, "vaebatch", False)


def test_lowvram_and_tiles_use_the_webui_device_bookkeeping(webui):
    from modules import lowvram

    _, core = webui.run(batch_size=1, width=96, height=96)
    lowvram.setup_for_low_vram(webui.shared.sd_model)
    args = [True, 0, True, "webui settings", False, "cpu", "always", "exact", 8]
    _, ours = webui.run(alwayson={"VAE Batch": {"args": args}}, width=96, height=96)
    _close(_stack(ours), _stack(core), 1e-3)
    assert lowvram.module_in_gpu is None, "the webui sends everything back after the batch"
    assert "tiled ×1" in ours.infotexts[0]


def test_save_latents_writes_the_final_latents_with_their_infotext(webui, tmp_path):
    args = [True, 0, True, "webui settings", False, "cpu", "auto", "exact", 0, True]
    _, res = webui.run(
        alwayson={"VAE Batch": {"args": args}}, batch_size=2, n_iter=2, outpath_samples=str(tmp_path)
    )
    files = sorted((tmp_path / "latents").iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"
    batch = read_latents(files[0])
    assert batch.latents.shape == (4, 4, 8, 8)
    assert batch.parameters == res.infotexts
    assert batch.family == "sd1" and batch.scaling_factor == pytest.approx(0.18215)
    # decoding them again gives the same images
    from lib_vaebatch.engine.decode import decode_latents
    from lib_vaebatch.webui.backend import WebuiVAE

    again = decode_latents(WebuiVAE(webui.shared.sd_model), batch.latents)
    _close(torch.stack(again.outputs).add(1).div(2).clamp(0, 1), _stack(res))


def test_remote_backend_decodes_through_a_real_endpoint(webui, tmp_path):
    """VAE = remote: the latents go to a VAE Batch server on 127.0.0.1 (its built-in approximate
    VAE here) with the model's scaling; the images are that server's decode."""
    from lib_vaebatch.backends import ApproxVAE
    from lib_vaebatch.engine.decode import decode_latents
    from tests.ui.conftest import start_server, stop_server

    (tmp_path / "srv").mkdir()
    server = start_server(tmp_path / "srv", "--device", "cpu")
    try:
        webui.shared.opts.data["vaebatch_remote_url"] = server.url + "vaebatch/v1/remote/decode"
        args = [True, 0, True, "webui settings", False, "cpu", "auto", "exact", 0, True, "remote"]
        _, res = webui.run(
            alwayson={"VAE Batch": {"args": args}}, batch_size=2, outpath_samples=str(tmp_path / "out")
        )
    finally:
        stop_server(server)
    assert all("VAE Batch backend: remote" in t for t in res.infotexts)
    batch = read_latents(next((tmp_path / "out" / "latents").iterdir()))
    local = decode_latents(ApproxVAE("sd1"), batch.latents, scaling_factor=0.18215)
    # the endpoint answers float16 in [-1, 1]
    _close(torch.stack(local.outputs).add(1).div(2).clamp(0, 1), _stack(res), tol=2e-3)


def test_remote_endpoint_on_this_webui_itself_is_refused(webui, capsys):
    webui.shared.cmd_opts.port = None  # the default 7860
    webui.shared.opts.data["vaebatch_remote_url"] = "http://127.0.0.1:7860/vaebatch/v1/remote/decode"
    args = [True, 0, True, "webui settings", False, "cpu", "auto", "exact", 0, False, "remote"]
    _, res = webui.run(alwayson={"VAE Batch": {"args": args}}, batch_size=1)
    assert "is this webui itself" in capsys.readouterr().out
    assert len(res.images) == 1 and "VAE Batch: on" in res.infotexts[0]
    backend = A_params(res.infotexts[0])["VAE Batch backend"]
    assert backend == "webui (remote asked, the endpoint is this webui)"


def test_remote_with_no_endpoint_set_says_the_webui_vae_decoded(webui, capsys):
    webui.shared.opts.data["vaebatch_remote_url"] = ""
    args = [True, 0, True, "webui settings", False, "cpu", "auto", "exact", 0, False, "remote"]
    _, res = webui.run(alwayson={"VAE Batch": {"args": args}}, batch_size=2)
    assert "names no remote endpoint" in capsys.readouterr().out
    for text in res.infotexts:
        params = A_params(text)
        assert params["VAE Batch backend"] == "webui (remote asked, no endpoint set)", text
        assert params["VAE Batch"] == "on"


def test_xyz_axes_added_once_and_they_turn_the_option_on(webui, monkeypatch):
    import types

    from lib_vaebatch.webui import xyz

    class AxisOption:
        def __init__(
            self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None
        ):
            self.label, self.type, self.apply, self.choices = label, type, apply, choices

    class XYZ:  # the xyz_grid.py script class
        __module__ = "xyz_grid.py"

    module = types.SimpleNamespace(AxisOption=AxisOption, axis_options=[])
    webui.scripts.scripts_data.append(webui.scripts.ScriptClassData(XYZ, "xyz_grid.py", "", module))
    xyz.add_axes()
    xyz.add_axes()
    labels = [o.label for o in module.axis_options]
    assert len(labels) == len(set(labels)) == 5 and "VAE Batch: Tiled decode" in labels
    tiling = next(o for o in module.axis_options if o.label == "VAE Batch: Tiled decode")
    assert tiling.choices() == ["auto", "always", "never"]
    p = types.SimpleNamespace()
    tiling.apply(p, "always", ["always"])
    assert p.vaebatch_overrides == {"tiling": "always", "enabled": True}
    # a cell of the tile-mode axis reaches the tiler: exact-lean, with no spill store
    mode = next(o for o in module.axis_options if o.label == "VAE Batch: Tile mode")
    assert "exact-lean" in mode.choices()
    runner = webui.runners["txt2img"]
    args = webui.api.init_script_args({}, webui.defaults["txt2img"], runner)
    cell = webui.processing.StableDiffusionProcessingTxt2Img(scripts_runner=runner, script_args=args)
    tiling.apply(cell, "always", ["always"])
    mode.apply(cell, "exact-lean", ["exact", "exact-lean"])
    seen = record_tile_settings(monkeypatch)
    webui.shared.state.begin()
    try:
        res = webui.processing.process_images(cell)
    finally:
        webui.shared.state.end()
    assert "VAE Batch tile mode: exact-lean" in res.infotexts[0], res.infotexts
    assert seen and all(t.mode == "exact-lean" and t.spill is None for t in seen), seen
