"""Against a real ComfyUI with this checkout installed as a node pack (cloned, or linked, into
``custom_nodes/``) and started with ``--cpu``. Skipped unless ``VAEBATCH_COMFY_URL`` names it, e.g.
``VAEBATCH_COMFY_URL=http://127.0.0.1:7890 ./dev.sh test tests/comfy/test_comfy_live.py``.

``VAEBATCH_COMFY_VAE`` names the VAE file (in its ``models/vae``) the tests load (default
``lab-sd1-random-fp32.safetensors``: random weights, full SD size). Two more servers, when named:

* ``VAEBATCH_COMFY_FP16_URL``, started with ``--fp16-vae``, whose ``VAEBATCH_COMFY_OVERFLOW_VAE``
  overflows in fp16 (ComfyUI alone saves a black image; the node a real one, recovery reported);
* ``VAEBATCH_COMFY_LIMITED_URL``, started under an address-space limit (``ulimit -v``) at which its
  own VAEDecode of a 1024² image fails, where the node finishes it.

Everything goes through ``POST /prompt`` and ``GET /history`` (and ``/upload/image``, ``/view``,
``/interrupt``), as an API client does."""

from __future__ import annotations

import io
import json
import os
import time
import uuid

import numpy as np
import pytest

URL = os.environ.get("VAEBATCH_COMFY_URL", "").rstrip("/")
FP16_URL = os.environ.get("VAEBATCH_COMFY_FP16_URL", "").rstrip("/")
LIMITED_URL = os.environ.get("VAEBATCH_COMFY_LIMITED_URL", "").rstrip("/")
VAE = os.environ.get("VAEBATCH_COMFY_VAE", "lab-sd1-random-fp32.safetensors")
OVERFLOW_VAE = os.environ.get("VAEBATCH_COMFY_OVERFLOW_VAE", "lab-sdxl-fp16-overflow.safetensors")
pytestmark = pytest.mark.skipif(not URL, reason="VAEBATCH_COMFY_URL names no running ComfyUI")


def _session():
    import requests

    return requests.Session()


def upload(base: str, size: tuple[int, int], seed: int = 0, name: str | None = None) -> str:
    """A smooth random picture uploaded to the server's input folder; its file name there."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size[1] // 16 + 2, size[0] // 16 + 2, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    name = name or f"vaebatch-live-{size[0]}x{size[1]}-{seed}.png"
    r = _session().post(f"{base}/upload/image", files={"image": (name, buf.getvalue(), "image/png")},
                        data={"overwrite": "true"}, timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()["name"]


def queue(base: str, graph: dict) -> str:
    r = _session().post(f"{base}/prompt", json={"prompt": graph, "client_id": uuid.uuid4().hex}, timeout=60)
    if r.status_code != 200:
        raise PromptRefusedError(r.status_code, r.json())
    return r.json()["prompt_id"]


class PromptRefusedError(Exception):
    def __init__(self, status: int, body: dict) -> None:
        super().__init__(status, body)
        self.status, self.body = status, body


def wait(base: str, prompt_id: str, timeout: float = 1800) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = _session().get(f"{base}/history/{prompt_id}", timeout=60).json()
        if prompt_id in r and (
            r[prompt_id]["status"].get("completed") or r[prompt_id]["status"]["status_str"]
        ):
            return r[prompt_id]
        time.sleep(0.5)
    raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s")


def run(base: str, graph: dict, timeout: float = 1800) -> dict:
    return wait(base, queue(base, graph), timeout)


def images(base: str, entry: dict, node: str) -> list[np.ndarray]:
    from PIL import Image

    out = []
    for im in entry["outputs"][node]["images"]:
        r = _session().get(f"{base}/view", params=im, timeout=60)
        assert r.status_code == 200
        out.append(np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), dtype=np.int16))
    return out


def graph(image: str, vae: str = VAE, *, ours: bool = True, theirs: bool = True, **options) -> dict:
    """LoadImage -> VAELoader -> VAEEncode -> VAEBatchDecode (and VAEDecode) -> SaveImage."""
    g = {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": vae}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["1", 0], "vae": ["2", 0]}},
    }
    if ours:
        g["4"] = {"class_type": "VAEBatchDecode", "inputs": {"samples": ["3", 0], "vae": ["2", 0], **options}}
        g["5"] = {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "vaebatch"}}
    if theirs:
        g["6"] = {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["2", 0]}}
        g["7"] = {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "comfyui"}}
    return g


def levels(a: list[np.ndarray], b: list[np.ndarray]) -> int:
    return int(max(np.abs(x - y).max() for x, y in zip(a, b, strict=True)))


def test_the_nodes_are_listed_with_their_contract():
    info = _session().get(f"{URL}/object_info", timeout=120).json()
    assert list(info["VAEBatchDecode"]["input"]["required"]) == ["samples", "vae"]
    assert list(info["VAEBatchEncode"]["input"]["required"]) == ["pixels", "vae"]
    assert list(info["VAEBatchEncodeImages"]["input"]["required"]) == ["vae", "image_1"]
    assert "image_64" in info["VAEBatchEncodeImages"]["input"]["optional"]
    assert info["VAEBatchDecode"]["output"] == ["IMAGE", "STRING"]
    assert info["VAEBatchDecode"]["python_module"].startswith("custom_nodes.")
    js = _session().get(f"{URL}/extensions", timeout=60).json()
    assert any(p.endswith("/vaebatch.js") for p in js), js


def test_decode_within_2_levels_of_comfyuis_with_the_report_in_history():
    name = upload(URL, (256, 192), seed=1)
    entry = run(URL, graph(name))
    assert entry["status"]["status_str"] == "success", entry["status"]
    ours, theirs = images(URL, entry, "5"), images(URL, entry, "7")
    assert ours[0].shape == theirs[0].shape == (192, 256, 3)
    assert levels(ours, theirs) <= 2
    (report,) = entry["outputs"]["4"]["text"]
    assert report.startswith("VAE Batch decode: 1 image(s) of 256x192"), report


def test_encode_within_2_levels_of_comfyuis():
    name = upload(URL, (200, 136), seed=2)  # not multiples of 8: both crop to 200x136 -> 200x136
    g = {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
        "3": {"class_type": "VAEBatchEncode", "inputs": {"pixels": ["1", 0], "vae": ["2", 0]}},
        "4": {"class_type": "VAEEncode", "inputs": {"pixels": ["1", 0], "vae": ["2", 0]}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["2", 0]}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["2", 0]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "vaebatch-enc"}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "comfyui-enc"}},
    }
    entry = run(URL, g)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert levels(images(URL, entry, "7"), images(URL, entry, "8")) <= 2


def test_encode_images_of_mixed_sizes_decode_back_one_per_input_in_order():
    a, b, c = upload(URL, (64, 64), 3), upload(URL, (96, 48), 4), upload(URL, (64, 64), 5)
    g = {
        "1": {"class_type": "LoadImage", "inputs": {"image": a}},
        "2": {"class_type": "LoadImage", "inputs": {"image": b}},
        "3": {"class_type": "LoadImage", "inputs": {"image": c}},
        "4": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
        "5": {"class_type": "VAEBatchEncodeImages",
              "inputs": {"vae": ["4", 0], "image_1": ["1", 0], "image_2": ["2", 0], "image_3": ["3", 0]}},
        "6": {"class_type": "VAEBatchDecode", "inputs": {"samples": ["5", 0], "vae": ["4", 0]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "vaebatch-mixed"}},
    }  # fmt: skip
    entry = run(URL, g)
    assert entry["status"]["status_str"] == "success", entry["status"]
    shapes = [im.shape[:2] for im in images(URL, entry, "7")]
    assert shapes == [(64, 64), (48, 96), (64, 64)], shapes
    assert (
        "3 image(s) from 3 input(s), 2 size(s), 3 LATENT(s) in input order"
        in entry["outputs"]["5"]["text"][0]
    )


@pytest.mark.parametrize(
    ("options", "words"),
    [({"tile_size": 3}, "a tile is at least 8"), ({"max_chunk": "abc"}, "abc"),
     ({"ladder": "sideways"}, "sideways"), ({"tile_size": 10**9}, "expected 0..1024")],
)  # fmt: skip
def test_bad_option_values_are_refused_before_the_graph_runs(options, words):
    with pytest.raises(PromptRefusedError) as err:
        queue(URL, graph("vaebatch-live-256x192-1.png", theirs=False, **options))
    assert err.value.status == 400
    assert words in json.dumps(err.value.body["node_errors"]["4"]), err.value.body


def test_interrupt_stops_a_multi_chunk_decode_within_one_chunk():
    name = upload(URL, (256, 256), seed=6)
    g = graph(name, theirs=False, max_chunk=1)
    g["8"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": 6}}
    g["3"]["inputs"]["pixels"] = ["8", 0]
    assert run(URL, g)["status"]["status_str"] == "success"  # later runs reuse the cached latents
    g["4"]["inputs"]["nan_check"] = False  # a changed input: only the decode runs again
    start = time.monotonic()
    assert run(URL, g)["status"]["status_str"] == "success"
    per_image = (time.monotonic() - start) / 6
    g["4"]["inputs"]["tiling"] = "never"  # and again
    pid = queue(URL, g)
    time.sleep(1.5 * per_image)
    asked = time.monotonic()
    _session().post(f"{URL}/interrupt", timeout=60)
    entry = wait(URL, pid)
    stopped = time.monotonic() - asked
    assert entry["status"]["status_str"] == "error", entry["status"]
    assert any(m[0] == "execution_interrupted" for m in entry["status"]["messages"])
    print(f"interrupt: {per_image:.1f} s per image; stopped {stopped:.1f} s after POST /interrupt")
    assert stopped <= 1.5 * per_image + 2, (stopped, per_image)


@pytest.mark.skipif(not FP16_URL, reason="VAEBATCH_COMFY_FP16_URL names no ComfyUI started with --fp16-vae")
def test_an_fp16_overflow_comes_back_as_a_real_image_where_comfyui_saves_black():
    name = upload(FP16_URL, (32, 32), seed=7)
    entry = run(FP16_URL, graph(name, OVERFLOW_VAE))
    assert entry["status"]["status_str"] == "success", entry["status"]
    theirs, ours = images(FP16_URL, entry, "7"), images(FP16_URL, entry, "5")
    assert theirs[0].max() == 0, "ComfyUI alone: black"
    assert ours[0].std() > 1.0, "a real image"
    report = entry["outputs"]["4"]["text"][0]
    assert "recovered in bf16" in report and "fp16 weights ComfyUI loaded" in report, report


@pytest.mark.skipif(
    not LIMITED_URL, reason="VAEBATCH_COMFY_LIMITED_URL names no ComfyUI under a memory limit"
)
def test_under_a_real_memory_limit_the_node_finishes_what_comfyuis_decode_cannot():
    name = upload(LIMITED_URL, (1024, 1024), seed=8)
    g = graph(name, theirs=False)
    g["3"]["class_type"] = "VAEBatchEncode"  # ComfyUI's own encode may not fit either
    ours = run(LIMITED_URL, g, timeout=3600)
    assert ours["status"]["status_str"] == "success", ours["status"]
    report = ours["outputs"]["4"]["text"][0]
    assert "tiles" in report, report
    g = graph(name, ours=False)
    g["3"]["class_type"] = "VAEBatchEncode"  # the same latents (cached), ComfyUI's own decode
    theirs = run(LIMITED_URL, g, timeout=3600)
    assert theirs["status"]["status_str"] == "error", theirs["status"]
    messages = json.dumps(theirs["status"]["messages"])
    assert "VAEDecode" in messages and "memory" in messages.lower(), messages[-2000:]


def test_a_remote_vae_node_serves_the_nodes_and_comfyuis_own_decode(tmp_path):
    """VAE Batch Remote VAE pointed at a VAE Batch server started here (127.0.0.1, its built-in
    approximate VAE): encode and decode with the pack's nodes, and ComfyUI's own VAE Decode."""
    from tests.ui.conftest import running_server

    name = upload(URL, (128, 96), seed=31)
    with running_server(tmp_path, "--device", "cpu") as srv:
        g = {
            "1": {"class_type": "LoadImage", "inputs": {"image": name}},
            "2": {"class_type": "VAEBatchRemoteVAE",
                  "inputs": {"endpoint": srv.url + "vaebatch/v1/remote/decode", "family": "sd1"}},
            "3": {"class_type": "VAEBatchEncode", "inputs": {"pixels": ["1", 0], "vae": ["2", 0]}},
            "4": {"class_type": "VAEBatchDecode", "inputs": {"samples": ["3", 0], "vae": ["2", 0]}},
            "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "vbr"}},
            "6": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["2", 0]}},
            "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "cur"}},
        }  # fmt: skip
        entry = run(URL, g)
    assert entry["status"]["status_str"] == "success", entry["status"]
    ours, theirs = images(URL, entry, "5"), images(URL, entry, "7")
    assert ours[0].shape == (96, 128, 3) and levels(ours, theirs) <= 1
