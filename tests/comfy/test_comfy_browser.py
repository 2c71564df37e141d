"""ComfyUI's own front end with the pack installed, in a real browser (Debian chromium driven by
Playwright, headless): the nodes are found by the node search, an image input of "VAE Batch Encode
Images" appears as one is connected, and the shipped example workflow runs from the page's Run
button, with the image and the node's report shown. Skipped unless ``VAEBATCH_COMFY_URL`` names a
running ComfyUI (see test_comfy_live.py); screenshots go to the test's folder, and to
``VAEBATCH_SCREENSHOT_DIR`` when set."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from tests.comfy.test_comfy_live import URL, VAE, upload

pytestmark = pytest.mark.skipif(not URL, reason="VAEBATCH_COMFY_URL names no running ComfyUI")

EXAMPLES = Path(__file__).resolve().parents[2] / "example_workflows"


@pytest.fixture
def page(tmp_path):
    from tests.ui.test_browser import CHROMIUM, FLAGS, _browser_or_skip

    sync_playwright = _browser_or_skip()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(URL + "/")
            page.wait_for_function("() => window.app && window.app.graph", timeout=120_000)
            page.wait_for_timeout(1500)
            page.keyboard.press("Escape")  # the template dialog a fresh browser gets
            yield page
        finally:
            browser.close()


def _shot(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path))
    if out := os.environ.get("VAEBATCH_SCREENSHOT_DIR"):
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(out) / path.name)


def test_the_node_search_finds_the_nodes(page, tmp_path):
    page.evaluate("() => window.app.graph.clear()")
    page.mouse.dblclick(800, 500)
    page.keyboard.type("VAE Batch", delay=30)
    options = page.locator(".comfy-vue-node-search-container ~ * li, [role=listbox] li, [role=option]")
    options.first.wait_for(timeout=30_000)
    page.wait_for_timeout(500)
    texts = [t.replace("\n", " ") for t in options.all_inner_texts()]
    for name in ("VAE Batch Decode", "VAE Batch Encode", "VAE Batch Encode Images"):
        assert any(name in t for t in texts), texts
    _shot(page, tmp_path, "comfyui-node-search")
    page.keyboard.press("Enter")  # adds the first one
    page.wait_for_function(
        "() => window.app.graph._nodes.some(n => n.type === 'VAEBatchDecode')", timeout=10_000
    )


def test_image_inputs_grow_as_they_are_connected(page, tmp_path):
    names = page.evaluate(
        """async () => {
            const g = window.app.graph;
            g.clear();
            const enc = LiteGraph.createNode("VAEBatchEncodeImages");
            const load = LiteGraph.createNode("LoadImage");
            enc.pos = [500, 100]; load.pos = [100, 100];
            g.add(load); g.add(enc);
            await new Promise((r) => setTimeout(r, 100));
            const before = enc.inputs.map((i) => i.name).filter((n) => n.startsWith("image_"));
            load.connect(0, enc, enc.findInputSlot("image_1"));
            await new Promise((r) => setTimeout(r, 100));
            const after = enc.inputs.map((i) => i.name).filter((n) => n.startsWith("image_"));
            load.connect(0, enc, enc.findInputSlot("image_2"));
            await new Promise((r) => setTimeout(r, 100));
            const more = enc.inputs.map((i) => i.name).filter((n) => n.startsWith("image_"));
            return { before, after, more };
        }"""
    )
    assert names == {
        "before": ["image_1"],
        "after": ["image_1", "image_2"],
        "more": ["image_1", "image_2", "image_3"],
    }
    _shot(page, tmp_path, "comfyui-growing-inputs")


def test_the_example_workflow_runs_from_the_run_button(page, tmp_path):
    seed = int(time.time()) % 100_000  # a new image: ComfyUI would serve a graph it ran from its cache
    image = upload(URL, (256, 192), seed=seed, name=f"vaebatch-browser-{seed}.png")
    workflow = json.loads((EXAMPLES / "vae_batch_round_trip.json").read_text())
    for node in workflow["nodes"]:
        if node["type"] == "VAELoader":
            node["widgets_values"][0] = VAE
        if node["type"] == "LoadImage":
            node["widgets_values"][0] = image
    page.evaluate("(wf) => window.app.loadGraphData(wf)", workflow)
    page.wait_for_timeout(1000)
    started = time.time()
    page.get_by_role("button", name=re.compile(r"^\s*(Run|Queue)")).first.click()
    # the Save Image node shows the image, the decode node its report
    page.wait_for_function(
        "() => window.app.graph._nodes.some(n => n.type === 'SaveImage' && n.imgs && n.imgs.length)",
        timeout=900_000,
    )
    report = page.evaluate(
        """() => {
            const n = window.app.graph._nodes.find((n) => n.type === 'VAEBatchDecode');
            const w = n.widgets.find((w) => w.name === 'vaebatch_report');
            return w ? w.value : null;
        }"""
    )
    assert report is not None and report.startswith("VAE Batch decode: 1 image(s) of 256x192"), report
    page.wait_for_timeout(500)
    _shot(page, tmp_path, "comfyui-workflow")
    assert time.time() - started < 900
