"""The "Latent Batch" tab inside the (fake) webui: registered through on_ui_tabs, events run under
wrap_gradio_gpu_call with shared.state progress and interrupt, decoded images saved through
modules.images.save_image with a processing-like ``p``, VAEs from models/VAE, Send to img2img."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file

from lib_vaebatch.latents import read_latents
from lib_vaebatch.saving import read_infotext

FOX = "a red fox\nNegative prompt: blurry\nSteps: 12, Seed: 77, Size: 64x64, Model: tiny"


@pytest.fixture
def tab(webui, tmp_path, monkeypatch):
    from modules import sd_vae

    monkeypatch.chdir(tmp_path)
    vae_dir = tmp_path / "models" / "VAE"
    vae_dir.mkdir(parents=True)
    other = webui.models.ldm_vae(seed=5)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, vae_dir / "other.safetensors")
    sd_vae.vae_path = str(vae_dir)
    sd_vae.refresh_vae_list()
    webui.shared.opts.data["vaebatch_tab_outdir"] = str(tmp_path / "lb")
    tabs = webui.callbacks.ui_tabs_callback()
    assert len(tabs) == 1
    blocks, title, elem_id = tabs[0]
    assert (title, elem_id) == ("Latent Batch", "vaebatch_latent_batch")
    webui.blocks = blocks
    webui.out = tmp_path / "lb"
    return webui


def _event(blocks, elem_id):
    for dep, fn in zip(blocks.dependencies, blocks.fns, strict=True):
        if any(blocks.blocks[t].elem_id == elem_id for t in dep["targets"] if isinstance(t, int)):
            return fn.fn
    raise AssertionError(f"no event on {elem_id}")


def _component(blocks, elem_id):
    return next(b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == elem_id)


def _images(folder: Path) -> list[str]:
    folder.mkdir(exist_ok=True)
    fox = folder / "fox.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", FOX)
    Image.new("RGB", (64, 64), (200, 90, 20)).save(fox, pnginfo=info)
    plain = folder / "plain.png"
    Image.linear_gradient("L").resize((64, 64)).convert("RGB").save(plain)
    return [str(fox), str(plain)]


ENCODE_DEFAULTS = ["crop", "composite", "#ffffff", False, 0, "auto", False, False]
DECODE_DEFAULTS = ["png", "", "auto", 0, True, "bf16, fp32", "auto", "exact", 0]


def encode(tab, files, folder="", vae="Automatic"):
    fn = _event(tab.blocks, "vaebatch_lb_encode_run")
    return fn("task(enc1)", files, folder, vae, *ENCODE_DEFAULTS)


def decode(tab, files, folder="", vae="Automatic"):
    fn = _event(tab.blocks, "vaebatch_lb_decode_run")
    return fn("task(dec1)", files, folder, vae, *DECODE_DEFAULTS)


def test_round_trip_saves_through_the_webui_with_its_metadata(tab, tmp_path):
    from modules import call_queue, images

    files, previews, log = encode(tab, _images(tmp_path / "in"))
    assert "encoded 2/2" in log and "Time taken" in log  # the webui's wrapper appended its timing
    assert "task(enc1)" in call_queue.task_log
    batch = read_latents(files[0])
    assert batch.parameters[0] == FOX and len(previews) == 2
    # the latents are those of the loaded checkpoint's VAE, scaled as its decode_first_stage expects
    model = tab.shared.sd_model
    with torch.no_grad():
        x = torch.from_numpy(np.array(Image.open(tmp_path / "in" / "fox.png"))).float()
        x = (x / 127.5 - 1).permute(2, 0, 1)[None]
        expect = model.first_stage_model.encode(x).mode() * model.scale_factor
    torch.testing.assert_close(batch.latents[:1], expect, atol=1e-4, rtol=1e-4)

    gallery, _infotexts, info, log = decode(tab, files)
    assert "decoded and saved 2/2" in log
    assert len(gallery) == 2 and info.startswith("a red fox")
    calls = images.saved_calls[-2:]
    assert [c["seed"] for c in calls] == [77, None]  # no seed of its own: the webui's short name
    fox = calls[0]
    assert fox["p"].prompt == "a red fox" and fox["p"].negative_prompt == "blurry" and fox["p"].steps == 12
    assert fox["p"].all_seeds == [77] and fox["p"].width == 64
    assert Path(fox["path"]) == tab.out / "images"
    saved = sorted((tab.out / "images").iterdir())
    assert [p.name for p in saved] == ["00000-77-a red fox.png", "00001.png"]
    text = read_infotext(saved[0])
    assert text.startswith(FOX.split("\n")[0]) and "VAE Batch: on" in text and "Seed: 77" in text
    assert tab.shared.state.textinfo_log[-1].startswith("VAE Batch: decode")


def test_a_vae_from_models_vae_is_used_without_touching_the_loaded_one(tab, tmp_path):
    model = tab.shared.sd_model
    before = {k: v.clone() for k, v in model.first_stage_model.state_dict().items()}
    files, _, log = encode(tab, _images(tmp_path / "in"))
    dropdown = _component(tab.blocks, "vaebatch_lb_vae")
    names = [c if isinstance(c, str) else c[0] for c in dropdown.choices]  # gradio 3: str; 4: pairs
    assert names == ["Automatic", "other.safetensors"]
    g_auto, *_ = decode(tab, files, vae="Automatic")
    g_other, _, info, log = decode(tab, files, vae="other.safetensors")
    assert "decoded and saved 2/2" in log and "VAE Batch VAE: other.safetensors" in info
    a = np.array(Image.open(g_auto[0][0]), dtype=float)
    b = np.array(Image.open(g_other[0][0]), dtype=float)
    assert abs(a - b).mean() > 1.0  # a different VAE decodes differently
    after = model.first_stage_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_interrupt_keeps_what_is_done(tab, tmp_path, monkeypatch):
    files, *_ = encode(tab, _images(tmp_path / "in"))
    stop = _event(tab.blocks, "vaebatch_lb_decode_stop")
    from lib_vaebatch.webui import backend

    real = backend.WebuiVAE.decode

    def decode_then_interrupt(self, latents):
        out = real(self, latents)
        stop()  # the Interrupt button, pressed while the first chunk decodes
        return out

    monkeypatch.setattr(backend.WebuiVAE, "decode", decode_then_interrupt)
    fn = _event(tab.blocks, "vaebatch_lb_decode_run")
    values = list(DECODE_DEFAULTS)
    values[3] = 1  # chunk limit 1: one sample per chunk
    gallery, _, _, log = fn("task(dec2)", files, "", "Automatic", *values)
    assert len(gallery) == 1 and "interrupted: 1 sample(s) not decoded" in log
    assert len(list((tab.out / "images").iterdir())) == 1
    assert not tab.shared.state.interrupted  # the webui's wrapper resets it after the job


def test_bad_input_is_a_clear_message_not_a_traceback(tab, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    gallery, _, _, log = decode(tab, [str(bad)])
    assert gallery is None and "bad.safetensors" in log and "Traceback" not in log
    _, _, log = encode(tab, [], folder=str(tmp_path / "missing"))
    assert "does not exist" in log


def test_server_folders_follow_hide_ui_dir_config(webui, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    webui.shared.cmd_opts.hide_ui_dir_config = True
    (blocks, _, _), *_ = webui.callbacks.ui_tabs_callback()
    assert not _component(blocks, "vaebatch_lb_encode_dir").visible
    assert not _component(blocks, "vaebatch_lb_decode_dir").visible
    folder = tmp_path / "in"
    _images(folder)
    fn = _event(blocks, "vaebatch_lb_encode_run")
    _, _, log = fn("task(x)", None, str(folder), "Automatic", *ENCODE_DEFAULTS)
    assert "disabled" in log and not (tmp_path / "outputs").exists()


def test_send_to_img2img_and_inpaint_take_the_gallery_and_its_infotext(tab):
    from modules import infotext_utils

    bindings = {b.tabname: b for b in infotext_utils.registered_bindings}
    assert set(bindings) == {"img2img", "inpaint"}
    gallery = _component(tab.blocks, "vaebatch_lb_decode_gallery")
    info = _component(tab.blocks, "vaebatch_lb_info")
    assert all(
        b.source_image_component is gallery and b.source_text_component is info for b in bindings.values()
    )


def test_output_folder_setting_exists(tab):
    info = tab.shared.opts.data_labels["vaebatch_tab_outdir"]
    assert info.default == "outputs/latent-batch" and info.section == ("vae_batch", "VAE Batch")
