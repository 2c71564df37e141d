"""Against a real Forge (Neo, Forge, Classic or reForge started with --api and this extension
installed). Skipped unless VAEBATCH_FORGE_URL names it, e.g.
``VAEBATCH_FORGE_URL=http://127.0.0.1:7861 ./dev.sh test tests/forge/test_forge_live.py``.

With VAEBATCH_FORGE_OVERFLOW_CKPT naming a checkpoint whose VAE overflows in fp16 (and the Forge
started with its fp16-VAE flag: Neo ``--fp16-vae``, Forge/Classic ``--vae-in-fp16``), the NaN test
checks that Forge alone gives black images and the script gives real ones with the recovery in
the infotext."""

from __future__ import annotations

import base64
import io
import os

import numpy as np
import pytest

URL = os.environ.get("VAEBATCH_FORGE_URL", "").rstrip("/")
OVERFLOW = os.environ.get("VAEBATCH_FORGE_OVERFLOW_CKPT", "")
pytestmark = pytest.mark.skipif(not URL, reason="VAEBATCH_FORGE_URL names no running Forge")

ON = {"VAE Batch": {"args": [True]}}
HIRES = {
    "enable_hr": True, "hr_scale": 2, "hr_second_pass_steps": 1, "denoising_strength": 0.5,
    # Forge 2 / Neo answer 500 without it (processing.py: NoneType is not iterable); others ignore it.
    "hr_additional_modules": ["Use same choices"],
}  # fmt: skip


@pytest.fixture(scope="module")
def session():
    import requests

    s = requests.Session()
    r = s.get(f"{URL}/sdapi/v1/sd-models", timeout=120)
    assert r.status_code == 200, r.text
    return s


def _post(session, route, payload):
    r = session.post(f"{URL}/sdapi/v1/{route}", json=payload, timeout=900)
    assert r.status_code == 200, r.text[:2000]
    body = r.json()
    import json

    info = json.loads(body["info"])
    images = [_image(b) for b in body["images"]]
    first = info.get("index_of_first_image", 0)
    return images[first:], info["infotexts"][first:]


def _image(b64):
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def _txt2img(session, alwayson=None, **kw):
    payload = {
        "prompt": "a lighthouse", "seed": 11, "steps": 2, "width": 64, "height": 64, "batch_size": 2,
        "sampler_name": "Euler", "alwayson_scripts": alwayson or {}, **kw,
    }  # fmt: skip
    return _post(session, "txt2img", payload)


def _levels(a, b):
    return int(max(np.abs(x - y).max() for x, y in zip(a, b, strict=True)))


def test_script_is_listed_with_the_same_arguments_as_on_a1111(session):
    from lib_vaebatch.webui import args as A

    info = session.get(f"{URL}/sdapi/v1/script-info", timeout=60).json()
    ours = [s for s in info if s["name"] == "vae batch"]
    assert {s["is_img2img"] for s in ours} == {False, True}
    assert [a["label"] for a in ours[0]["args"]] == [a.label for a in A.ARGS]


@pytest.mark.parametrize("hires", [None, "Latent", "Lanczos"])
def test_txt2img_every_image_tagged_and_within_2_levels_of_forge(session, hires):
    hr = {**HIRES, "hr_upscaler": hires} if hires else {}
    plain, plain_texts = _txt2img(session, **hr)
    ours, texts = _txt2img(session, ON, **hr)
    assert len(ours) == 2 and all("VAE Batch: " in t for t in texts), texts
    assert not any("VAE Batch" in t for t in plain_texts)
    assert all(im.shape[:2] == ((128, 128) if hires else (64, 64)) for im in ours)
    assert _levels(plain, ours) <= 2


def test_img2img_takeover_within_2_levels_of_forge(session):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(buf, format="PNG")
    init = base64.b64encode(buf.getvalue()).decode()
    payload = {"init_images": [init], "prompt": "a lighthouse", "seed": 5, "steps": 2, "width": 64,
               "height": 64, "batch_size": 2, "denoising_strength": 0.5, "sampler_name": "Euler"}  # fmt: skip
    # Forge's init encode samples the posterior with the global RNG, whose state is whatever the
    # previous job left: an identical job first puts both runs below in the same state.
    _post(session, "img2img", payload)
    plain, _ = _post(session, "img2img", payload)
    ours, texts = _post(session, "img2img", {**payload, "alwayson_scripts": ON})
    assert len(ours) == 2 and all("VAE Batch: " in t for t in texts), texts
    assert _levels(plain, ours) <= 2


@pytest.mark.skipif(not OVERFLOW, reason="VAEBATCH_FORGE_OVERFLOW_CKPT names no overflowing checkpoint")
def test_fp16_overflow_gives_real_images_where_forge_gives_black(session):
    over = {
        "override_settings": {"sd_model_checkpoint": OVERFLOW},
        "override_settings_restore_afterwards": True,
    }
    plain, _ = _txt2img(session, **over)
    assert all(im.max() == 0 for im in plain), "Forge alone gives black images (is the VAE in fp16?)"
    ours, texts = _txt2img(session, ON, **over)
    assert all(im.std() > 1.0 for im in ours), "real images"
    assert all("recovered" in t for t in texts), texts


def test_latent_batch_routes_encode_and_decode(session):
    import torch
    from PIL import Image

    info = session.get(f"{URL}/vaebatch/v1/info", timeout=120).json()
    assert info["vae"] == "Automatic" and info["family"] == "sd1", info
    t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    payload = {"tensor": base64.b64encode(t.numpy().tobytes()).decode(), "shape": [2, 4, 8, 8]}
    r = session.post(f"{URL}/vaebatch/v1/decode", json=payload, timeout=600)
    assert r.status_code == 200, r.text
    assert [x["status"] for x in r.json()["results"]] == ["ok", "ok"]
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (30, 160, 90)).save(buf, format="PNG")
    body = {"images": [base64.b64encode(buf.getvalue()).decode()]}
    first = session.post(f"{URL}/vaebatch/v1/encode", json=body, timeout=600)
    second = session.post(f"{URL}/vaebatch/v1/encode", json=body, timeout=600)
    assert first.status_code == 200, first.text[:1000]
    assert first.json()["shape"] == [1, 4, 8, 8]
    from safetensors.torch import load

    a, b = (load(base64.b64decode(r.json()["latents"]))["latents"] for r in (first, second))
    assert torch.equal(a, b), "deterministic encode (posterior mean)"


def test_latent_batch_tab_in_a_real_browser(tmp_path):
    """Encode an image with an infotext in the real tab, download the latents, decode them."""
    from PIL import Image, PngImagePlugin

    from tests.ui.test_browser import CHROMIUM, FLAGS, _browser_or_skip

    sync_playwright = _browser_or_skip()
    src = tmp_path / "fox.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a red fox\nSteps: 3, Seed: 99, Size: 64x64")
    Image.new("RGB", (64, 64), (200, 80, 30)).save(src, pnginfo=info)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1200}, accept_downloads=True)
            page.goto(URL + "/")
            page.wait_for_selector("#tabs", timeout=180_000)
            page.locator("#tabs button", has_text="Latent Batch").first.click()
            page.locator("#vaebatch_lb_encode_files input[type=file]").set_input_files([str(src)])
            page.click("#vaebatch_lb_encode_run")
            page.locator("#vaebatch_lb_encode_log li").first.wait_for(timeout=300_000)
            assert "encoded 1/1" in page.inner_text("#vaebatch_lb_encode_log")
            with page.expect_download() as dl:
                page.locator("#vaebatch_lb_encode_output a[download]").first.click()
            latents = tmp_path / dl.value.suggested_filename
            dl.value.save_as(latents)
            page.locator("#vaebatch_lb_tabs button", has_text="Decode").first.click()
            page.locator("#vaebatch_lb_decode_files input[type=file]").set_input_files([str(latents)])
            page.click("#vaebatch_lb_decode_run")
            page.locator("#vaebatch_lb_decode_log li").first.wait_for(timeout=300_000)
            assert "decoded and saved 1/1" in page.inner_text("#vaebatch_lb_decode_log")
            info_text = page.input_value("#vaebatch_lb_info textarea")
            assert info_text.startswith("a red fox") and "VAE Batch: on" in info_text
            page.screenshot(path=str(tmp_path / "forge-tab.png"))
        finally:
            browser.close()


def _params(text):
    from lib_vaebatch.infotext import parse_params

    return parse_params(text.splitlines()[-1])


def test_bad_arguments_say_in_the_info_that_vae_batch_was_off_and_why(session):
    _, texts = _txt2img(session, {"VAE Batch": {"args": [True, "abc"]}}, batch_size=1)
    assert _params(texts[0])["VAE Batch"] == "off (Max chunk (0 = auto): expected a whole number, not 'abc')"


def test_remote_without_an_endpoint_says_the_forge_vae_decoded(session):
    args = [True, 0, True, "webui settings", False, "cpu", "auto", "exact", 0, False, "remote"]
    _, texts = _txt2img(session, {"VAE Batch": {"args": args}}, batch_size=1)
    assert _params(texts[0])["VAE Batch backend"] == "webui (remote asked, no endpoint set)", texts[0]
