"""The /vaebatch/v1 routes of the standalone app, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request

import pytest
import torch
from PIL import Image
from safetensors.torch import save as st_save

from lib_vaebatch.backends import ApproxVAE
from lib_vaebatch.engine.decode import decode_latents
from lib_vaebatch.images import tensor_to_image
from lib_vaebatch.saving import read_infotext
from tests.api.conftest import url


def post(server, path, payload, *, raw: bytes | None = None, headers=None):
    data = raw if raw is not None else json.dumps(payload).encode()
    req = urllib.request.Request(url(server, path), data=data, headers={"Content-Type": "application/json"})
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png(text_or_image) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text_or_image)))


def local_images(latents: torch.Tensor) -> list[Image.Image]:
    result = decode_latents(ApproxVAE("sd1"), latents)
    return [tensor_to_image(o) for o in result.outputs]


def test_decode_a_raw_tensor_equals_a_local_decode(api_server):
    t = torch.randn(3, 4, 8, 12, generator=torch.Generator().manual_seed(1))
    status, body = post(
        api_server,
        "/vaebatch/v1/decode",
        {"tensor": b64(t.numpy().tobytes()), "shape": list(t.shape), "dtype": "float32"},
    )
    assert status == 200, body
    assert [r["status"] for r in body["results"]] == ["ok"] * 3
    for got, want, text in zip(body["images"], local_images(t), body["infotexts"], strict=True):
        image = png(got)
        assert image.size == (96, 64) and image.tobytes() == want.tobytes()
        assert read_infotext(image) == text and "VAE Batch: on" in text


def test_decode_a_latents_file_keeps_its_infotext_and_can_save(api_server):
    t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    meta = {
        "format": "vaebatch/1",
        "family": "sd1",
        "parameters": json.dumps(["a cat\nSteps: 5, Seed: 42, Sampler: Euler"]),
    }
    data = st_save({"latents": t}, metadata=meta)
    status, body = post(api_server, "/vaebatch/v1/decode", {"latents": b64(data), "save": True})
    assert status == 200, body
    assert body["infotexts"][0].startswith("a cat\nSteps: 5, Seed: 42, Sampler: Euler, ")
    saved = body["saved"]
    assert len(saved) == 1 and read_infotext(saved[0]) == body["infotexts"][0]
    assert str(api_server.out.resolve()) in str(__import__("pathlib").Path(saved[0]).resolve())


def test_encode_then_decode_round_trip(api_server):
    buf = io.BytesIO()
    Image.linear_gradient("L").resize((64, 48)).convert("RGB").save(buf, "PNG")
    status, enc = post(
        api_server, "/vaebatch/v1/encode", {"images": [b64(buf.getvalue())] * 2, "parameters": ["x", "y"]}
    )
    assert status == 200, enc
    assert enc["shape"] == [2, 4, 6, 8] and [r["status"] for r in enc["results"]] == ["ok", "ok"]
    status, dec = post(api_server, "/vaebatch/v1/decode", {"latents": enc["latents"]})
    assert status == 200 and [i.split("\n")[0] for i in dec["infotexts"]] == ["x", "y"]
    assert png(dec["images"][0]).size == (64, 48)


def test_info_describes_the_vae_and_every_option(api_server):
    with urllib.request.urlopen(url(api_server, "/vaebatch/v1/info"), timeout=30) as r:
        info = json.load(r)
    assert info["family"] == "sd1" and info["vae"] in info["vaes"]
    names = {o["name"] for o in info["options"]}
    assert {"max_chunk", "nan_check", "ladder", "tiling", "tile_mode", "tile_size"} <= names


@pytest.mark.parametrize(
    ("payload", "status", "needle"),
    [
        ({"tensor": "AAAA", "shape": [1, 4, 8, 8], "dtype": "float32"}, 422, "do not match"),
        ({"tensor": "!!", "shape": [1, 4, 8, 8]}, 422, "base64"),
        ({"latents": b64(b"not a safetensors file")}, 422, "latents"),
        ({}, 422, "either"),
        ({"tensor": "AAAA", "shape": [1, 4, 8, 8], "options": {"nope": 1}}, 422, "engine options"),
        ([1, 2, 3], 422, "JSON object"),
    ],
)
def test_bad_requests_are_json_4xx(api_server, payload, status, needle):
    got, body = post(api_server, "/vaebatch/v1/decode", payload)
    assert got == status and needle in (body["error"] + str(body["detail"])), body


def test_openapi_documents_the_routes(api_server):
    with urllib.request.urlopen(url(api_server, "/openapi.json"), timeout=30) as r:
        spec = json.load(r)
    decode = spec["paths"]["/vaebatch/v1/decode"]["post"]
    body = decode["requestBody"]["content"]["application/json"]["schema"]
    assert {"latents", "tensor", "shape", "dtype", "options", "save"} <= set(body["properties"])
    assert {"200", "413", "422"} <= set(decode["responses"])
    assert "/vaebatch/v1/info" in spec["paths"] and "/vaebatch/v1/encode" in spec["paths"]
