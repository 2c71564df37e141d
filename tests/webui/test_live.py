"""Against a real webui (A1111 1.10.1 started with --api and this extension installed), through
the ``webuiapi`` client. Skipped unless VAEBATCH_WEBUI_URL names it, e.g.
``VAEBATCH_WEBUI_URL=http://127.0.0.1:7860 ./dev.sh test tests/webui/test_live.py``."""

from __future__ import annotations

import os

import pytest

URL = os.environ.get("VAEBATCH_WEBUI_URL", "").rstrip("/")
pytestmark = pytest.mark.skipif(not URL, reason="VAEBATCH_WEBUI_URL names no running webui")

ON = {"VAE Batch": {"args": [True]}}


@pytest.fixture(scope="module")
def api():
    webuiapi = pytest.importorskip("webuiapi")
    return webuiapi.WebUIApi(baseurl=f"{URL}/sdapi/v1", steps=2, sampler="Euler")


def _infotexts(result):
    info = result.info
    return info["infotexts"][info.get("index_of_first_image", 0) :] if isinstance(info, dict) else []


def _txt2img(api, alwayson=None, **kw):
    args = {"prompt": "a lighthouse", "seed": 11, "width": 64, "height": 64, "batch_size": 2, "steps": 2}
    return api.txt2img(alwayson_scripts=alwayson or {}, **(args | kw))


def test_script_is_listed_with_its_arguments(api):
    from lib_vaebatch.webui import args as A

    info = api.session.get(f"{URL}/sdapi/v1/script-info", timeout=60).json()
    ours = [s for s in info if s["name"] == "vae batch"]
    assert {s["is_img2img"] for s in ours} == {False, True}
    assert [a["label"] for a in ours[0]["args"]] == [a.label for a in A.ARGS]


@pytest.mark.parametrize("hires", [None, "Latent", "Lanczos"])
def test_txt2img_takeover_with_and_without_hires_fix(api, hires):
    hr = {"enable_hr": True, "hr_upscaler": hires, "hr_scale": 2, "hr_second_pass_steps": 2,
          "denoising_strength": 0.5} if hires else {}  # fmt: skip
    result = _txt2img(api, ON, **hr)
    texts = _infotexts(result)
    assert len(result.images) == 2 and len(texts) == 2
    assert all("VAE Batch: " in t for t in texts), texts
    size = 128 if hires else 64
    assert all(im.size == (size, size) for im in result.images)


def test_a_job_without_the_script_is_untouched(api):
    plain = _txt2img(api)
    assert not any("VAE Batch" in t for t in _infotexts(plain))
    ours = _txt2img(api, ON)
    # Same seed, same model: the engine's decode equals the webui's (fp32 on CPU), up to PNG rounding.
    import numpy as np

    for a, b in zip(plain.images, ours.images, strict=True):
        assert np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max() <= 1


def test_img2img_takeover(api):
    from PIL import Image

    init = Image.new("RGB", (64, 64), (200, 40, 40))
    result = api.img2img(
        images=[init], prompt="a lighthouse", seed=5, width=64, height=64, batch_size=2, steps=2,
        denoising_strength=0.5, alwayson_scripts=ON,
    )  # fmt: skip
    texts = _infotexts(result)
    assert len(result.images) == 2 and all("VAE Batch: " in t for t in texts)


def test_unknown_script_title_is_a_422(api):
    r = api.session.post(
        f"{URL}/sdapi/v1/txt2img",
        json={
            "prompt": "x",
            "steps": 1,
            "width": 64,
            "height": 64,
            "alwayson_scripts": {"VAE Batchh": {"args": [True]}},
        },
        timeout=120,
    )
    assert r.status_code == 422


def _params(text: str) -> dict[str, str]:
    from lib_vaebatch.infotext import parse_params

    return parse_params(text.splitlines()[-1])


@pytest.mark.parametrize(
    ("args", "why"),
    [([True, "abc"], "off (Max chunk (0 = auto): expected a whole number, not 'abc')"),
     ([True, -3], "off (Max chunk (0 = auto): -3 is outside 0..64)"),
     ([True, 0, True, "webui settings", False, "cpu", "auto", "exact", 10**9], "off (Tile size"),
     ([True, 0, True, "sometimes"], "off (Recovery precisions: 'sometimes' is not one of")],
)  # fmt: skip
def test_bad_arguments_say_in_the_info_that_vae_batch_was_off_and_why(api, args, why):
    result = _txt2img(api, {"VAE Batch": {"args": args}}, batch_size=1)
    (text,) = _infotexts(result)
    assert _params(text)["VAE Batch"].startswith(why), text


def test_remote_without_an_endpoint_says_the_webui_vae_decoded(api):
    args = [True, 0, True, "webui settings", False, "cpu", "auto", "exact", 0, False, "remote"]
    result = _txt2img(api, {"VAE Batch": {"args": args}}, batch_size=1)
    (text,) = _infotexts(result)
    assert _params(text)["VAE Batch backend"] == "webui (remote asked, no endpoint set)", text


def test_latent_batch_tab_in_a_real_browser(tmp_path):
    """The tab inside the real webui: encode an image carrying an infotext, download the latents,
    decode them (saved by the webui's own save_image), and Send to img2img carries the prompt."""
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
            page.wait_for_selector("#tabs", timeout=120_000)
            page.locator("#tabs > .tab-nav button", has_text="Latent Batch").click()
            page.locator("#vaebatch_lb_encode_files input[type=file]").set_input_files([str(src)])
            page.click("#vaebatch_lb_encode_run")
            page.locator("#vaebatch_lb_encode_log li").first.wait_for(timeout=120_000)
            assert "encoded 1/1" in page.inner_text("#vaebatch_lb_encode_log")
            with page.expect_download() as dl:
                page.locator("#vaebatch_lb_encode_output a[download]").first.click()
            latents = tmp_path / dl.value.suggested_filename
            dl.value.save_as(latents)

            page.locator("#vaebatch_lb_tabs button", has_text="Decode").first.click()
            page.locator("#vaebatch_lb_decode_files input[type=file]").set_input_files([str(latents)])
            page.click("#vaebatch_lb_decode_run")
            page.locator("#vaebatch_lb_decode_log li").first.wait_for(timeout=120_000)
            assert "decoded and saved 1/1" in page.inner_text("#vaebatch_lb_decode_log")
            thumbs = page.locator("#vaebatch_lb_decode_gallery .thumbnail-item")
            assert thumbs.count() == 1 and "-99." in thumbs.first.inner_text()  # the webui's [seed] name
            info_text = page.input_value("#vaebatch_lb_info textarea")
            assert info_text.startswith("a red fox") and "VAE Batch: on" in info_text
            thumbs.first.click()
            page.locator("#vaebatch_lb_decode_tab button", has_text="img2img").first.click()
            page.wait_for_function(
                "() => document.querySelector('#img2img_prompt textarea').value === 'a red fox'",
                timeout=30_000,
            )
        finally:
            browser.close()


def test_vaebatch_api_routes_in_the_webui(api):
    import base64

    import torch

    info = api.session.get(f"{URL}/vaebatch/v1/info", timeout=60).json()
    assert info["vae"] == "Automatic" and info["family"] in ("sd1", "sd2", "sdxl", "sd3")
    t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    payload = {"tensor": base64.b64encode(t.numpy().tobytes()).decode(), "shape": [2, 4, 8, 8]}
    r = api.session.post(f"{URL}/vaebatch/v1/decode", json=payload, timeout=300)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["status"] for x in body["results"]] == ["ok", "ok"] and len(body["images"]) == 2
    bad = api.session.post(f"{URL}/vaebatch/v1/decode", json={"tensor": "AAAA", "shape": [1, 4, 8, 8]})
    assert bad.status_code == 422 and "do not match" in bad.json()["error"]


def test_remote_vae_backend_in_a_real_generation(api, tmp_path):
    """The script's VAE = remote, pointed at a standalone VAE Batch server on 127.0.0.1 (not at the
    webui itself: its queue lock is held by the generation)."""
    from tests.ui.conftest import start_server, stop_server

    server = start_server(tmp_path, "--device", "cpu")
    key = "vaebatch_remote_url"
    before = api.session.get(f"{URL}/sdapi/v1/options", timeout=60).json().get(key, "")
    try:
        r = api.session.post(
            f"{URL}/sdapi/v1/options", json={key: server.url + "vaebatch/v1/remote/decode"}, timeout=60
        )
        assert r.status_code == 200, r.text
        args = [True, 0, True, "webui settings", False, "cpu", "auto", "exact", 0, False, "remote"]
        result = _txt2img(api, {"VAE Batch": {"args": args}})
        texts = _infotexts(result)
        assert len(result.images) == 2 and all("VAE Batch backend: remote" in t for t in texts), texts
        local = _txt2img(api, ON)  # same seed, the checkpoint's own VAE
    finally:
        api.session.post(f"{URL}/sdapi/v1/options", json={key: before}, timeout=60)
        stop_server(server)
    import numpy as np

    # the server decodes with its built-in approximate VAE, not the checkpoint's: other pixels
    for a, b in zip(result.images, local.images, strict=True):
        assert np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean() > 5
