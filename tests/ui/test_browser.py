"""The standalone app in a real browser (Debian chromium, headless, driven by Playwright): upload
images, encode, download the latents, upload them, decode, and check the gallery and the saved files.

Skipped when chromium or Playwright is missing, unless VAEBATCH_REQUIRE_BROWSER=1 (CI sets it)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from lib_vaebatch import infotext
from lib_vaebatch.saving import read_infotext
from tests.ui.conftest import ROOT, Server

CHROMIUM = os.environ.get("VAEBATCH_CHROMIUM", "/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = ROOT / "test-artifacts"
FOX = "a red fox in the snow\nNegative prompt: blurry\nSteps: 20, Seed: 1234, Size: 64x64, Model: tiny"


def _browser_or_skip():
    missing = []
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append("the playwright package")
        sync_playwright = None
    if not Path(CHROMIUM).exists():
        missing.append(CHROMIUM)
    if missing:
        if os.environ.get("VAEBATCH_REQUIRE_BROWSER") == "1":
            pytest.fail("browser test required but missing: " + ", ".join(missing))
        pytest.skip("needs " + ", ".join(missing))
    return sync_playwright


def _inputs(folder: Path) -> list[Path]:
    folder.mkdir()
    fox = folder / "fox.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", FOX)
    Image.new("RGB", (64, 64), (200, 80, 30)).save(fox, pnginfo=info)
    wide = folder / "wide.jpg"
    Image.linear_gradient("L").resize((96, 64)).convert("RGB").save(wide, quality=92)
    alpha = folder / "alpha.png"
    Image.new("RGBA", (64, 64), (10, 120, 200, 128)).save(alpha)
    return [fox, wide, alpha]


def test_encode_download_decode_in_chromium(server: Server, tmp_path: Path):
    sync_playwright = _browser_or_skip()
    images = _inputs(tmp_path / "inputs")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100}, accept_downloads=True)
            page.goto(server.url)
            page.wait_for_selector("#vaebatch_lb_encode_run", timeout=60_000)

            # pick the tiny VAE from the list (the built-in approx one is the default)
            page.locator("#vaebatch_lb_vae input").click()
            page.locator("#vaebatch_lb_vae li", has_text="tiny-vae").first.click()

            page.locator("#vaebatch_lb_encode_files input[type=file]").set_input_files(
                [str(p) for p in images]
            )
            page.click("#vaebatch_lb_encode_run")
            links = page.locator("#vaebatch_lb_encode_output a[download]")
            links.nth(1).wait_for(timeout=120_000)  # two sizes: two latents files
            assert links.count() == 2
            assert "encoded 3/3" in page.inner_text("#vaebatch_lb_encode_log")
            latents = []
            for i in range(links.count()):
                with page.expect_download() as dl:
                    links.nth(i).click()
                target = downloads / dl.value.suggested_filename
                dl.value.save_as(target)
                latents.append(target)
            assert all(p.suffix == ".safetensors" and p.stat().st_size > 0 for p in latents)

            page.locator("#vaebatch_lb_tabs button", has_text="Decode").first.click()
            page.locator("#vaebatch_lb_decode_files input[type=file]").set_input_files(
                [str(p) for p in latents]
            )
            page.fill("#vaebatch_lb_pattern textarea, #vaebatch_lb_pattern input", "[seed]-[prompt_spaces]")
            page.click("#vaebatch_lb_decode_run")
            thumbs = page.locator("#vaebatch_lb_decode_gallery .thumbnail-item")
            thumbs.nth(2).wait_for(timeout=120_000)
            assert thumbs.count() == 3
            assert "decoded and saved 3/3" in page.inner_text("#vaebatch_lb_decode_log")
            page.screenshot(path=str(ARTIFACTS / "latent-batch-decode.png"), full_page=True)
        finally:
            browser.close()

    # the downloaded files are the ones the server kept
    kept = sorted((server.out / "latents").glob("*.safetensors"))
    assert [p.read_bytes() for p in kept] == [p.read_bytes() for p in sorted(latents)]
    saved = sorted((server.out / "images").glob("*.png"))
    assert len(saved) == 3
    texts = {p.name: read_infotext(p) for p in saved}
    assert all(t and "VAE Batch: on" in t and "VAE Batch VAE: tiny-vae" in t for t in texts.values())
    fox = [name for name, t in texts.items() if t.startswith("a red fox in the snow")]
    assert len(fox) == 1, texts
    parsed = infotext.parse(texts[fox[0]])
    assert parsed.params["Seed"] == "1234" and parsed.negative_prompt == "blurry"
    assert fox[0].endswith("-1234-a red fox in the snow.png")
    # images with no seed of their own are named <latents file>-<index> (the webui drops its
    # pattern without a seed too); nothing is written outside the output folder
    others = sorted(set(texts) - set(fox))
    assert all("[" not in name and "-latents-" in name for name in others), others
    assert all(p.resolve().is_relative_to(server.out.resolve()) for p in server.out.rglob("*"))
    shutil.copy(saved[0], ARTIFACTS / "latent-batch-first-image.png")
