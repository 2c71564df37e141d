"""The same app under gradio 4.40 (Forge's UI stack): it builds, ``serve`` answers, and an encode
and a decode run from a real browser. Runs with the interpreter named by VAEBATCH_GRADIO4_PYTHON
(default ``.venv-gradio4/bin/python``, which .ci/run installs from requirements/constraints-gradio4.txt);
skipped without one unless VAEBATCH_REQUIRE_GRADIO4=1."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from lib_vaebatch.saving import read_infotext
from tests.ui.conftest import ROOT, running_server
from tests.ui.test_browser import ARTIFACTS, CHROMIUM, FLAGS, _browser_or_skip

PYTHON = os.environ.get("VAEBATCH_GRADIO4_PYTHON", str(ROOT / ".venv-gradio4" / "bin" / "python"))


@pytest.fixture
def server4(tmp_path: Path):
    if not Path(PYTHON).exists():
        if os.environ.get("VAEBATCH_REQUIRE_GRADIO4") == "1":
            pytest.fail(f"gradio 4 interpreter {PYTHON} is missing")
        pytest.skip(f"no gradio 4 interpreter at {PYTHON}")
    with running_server(tmp_path, "--device", "cpu", python=PYTHON) as srv:
        yield srv


def test_builds_and_serves_under_gradio4(server4):
    with urllib.request.urlopen(server4.url + "config", timeout=10) as r:
        config = json.load(r)
    assert config["version"].startswith("4.40")
    ids = {c["props"].get("elem_id") for c in config["components"]}
    assert {"vaebatch_lb_encode_run", "vaebatch_lb_decode_run", "vaebatch_lb_decode_gallery"} <= ids


def test_encode_and_decode_in_a_browser_under_gradio4(server4, tmp_path: Path):
    sync_playwright = _browser_or_skip()
    src = tmp_path / "in.png"
    Image.linear_gradient("L").resize((64, 64)).convert("RGB").save(src)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(server4.url)
            page.wait_for_selector("#vaebatch_lb_encode_run", timeout=60_000)
            page.locator("#vaebatch_lb_encode_files input[type=file]").set_input_files([str(src)])
            page.click("#vaebatch_lb_encode_run")
            page.locator("#vaebatch_lb_encode_log li").first.wait_for(timeout=120_000)
            assert "encoded 1/1" in page.inner_text("#vaebatch_lb_encode_log")
            latents = sorted((server4.out / "latents").glob("*.safetensors"))
            assert len(latents) == 1

            page.locator("#vaebatch_lb_tabs button", has_text="Decode").first.click()
            page.locator("#vaebatch_lb_decode_files input[type=file]").set_input_files([str(latents[0])])
            page.click("#vaebatch_lb_decode_run")
            page.locator("#vaebatch_lb_decode_log li").first.wait_for(timeout=120_000)
            assert "decoded and saved 1/1" in page.inner_text("#vaebatch_lb_decode_log")
            page.locator("#vaebatch_lb_decode_gallery img").first.wait_for(timeout=30_000)
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "latent-batch-gradio4.png"), full_page=True)
        finally:
            browser.close()
    saved = sorted((server4.out / "images").glob("*.png"))
    assert len(saved) == 1 and "VAE Batch: on" in (read_infotext(saved[0]) or "")
