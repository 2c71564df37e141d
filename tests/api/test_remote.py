"""The Hybrid Inference endpoints (/vaebatch/v1/remote/*) driven by diffusers' unmodified
``remote_decode``/``remote_encode``, and :class:`RemoteVAE` against them, over real HTTP on
127.0.0.1 with tiny real diffusers VAEs."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from lib_vaebatch.backends import load_vae
from lib_vaebatch.backends.base import VAEBackend
from lib_vaebatch.backends.remote import RemoteVAE, RemoteVAEError
from lib_vaebatch.engine.decode import decode_latents
from lib_vaebatch.engine.encode import encode_pixels
from lib_vaebatch.images import tensor_to_image, to_unit_range
from lib_vaebatch.saving import encode_image
from tests.api.conftest import Server, url
from tests.ui.conftest import free_port, running_server


def client():  # -> the module diffusers.utils.remote_utils
    """diffusers' own client (diffusers >= 0.33): the tests that drive it skip without it, the
    server's and RemoteVAE's own tests run anyway (A1111's stack has diffusers 0.31 at most)."""
    return pytest.importorskip("diffusers.utils.remote_utils", reason="needs diffusers >= 0.33's client")


def remote_decode(*args, **kwargs):
    return client().remote_decode(*args, **kwargs)


def remote_encode(*args, **kwargs):
    return client().remote_encode(*args, **kwargs)


pytestmark = pytest.mark.filterwarnings("ignore:`do_scaling` is deprecated:FutureWarning")

DECODE = "/vaebatch/v1/remote/decode"
ENCODE = "/vaebatch/v1/remote/encode"
SD_SCALE = 0.18215
FLUX_SCALE, FLUX_SHIFT = 0.3611, 0.1159


@pytest.fixture(scope="module")
def vaes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-sd (4 channels), tiny-flux (16 channels) and tiny-nan (decodes to NaN in any dtype)."""
    from tests.support import tiny_autoencoder

    root = tmp_path_factory.mktemp("remote-vaes") / "vaes"
    tiny_autoencoder(seed=3).save_pretrained(root / "tiny-sd", safe_serialization=True)
    tiny_autoencoder(16, seed=4).save_pretrained(root / "tiny-flux", safe_serialization=True)
    broken = tiny_autoencoder(seed=5)
    with torch.no_grad():
        broken.decoder.conv_out.bias.fill_(float("nan"))
    broken.save_pretrained(root / "tiny-nan", safe_serialization=True)
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, vaes: Path) -> Iterator[Server]:
    with running_server(
        tmp_path_factory.mktemp("remote"),
        "--vae",
        str(vaes / "tiny-sd"),
        "--vae-dir",
        str(vaes),
        "--device",
        "cpu",
        "--api-max-mb",
        "1",
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def local(vaes: Path) -> dict[str, VAEBackend]:
    return {name: load_vae(vaes / name, device="cpu") for name in ("tiny-sd", "tiny-flux")}


def latents(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def local_decode(
    backend: VAEBackend, z: torch.Tensor, scale: float | None, shift: float | None
) -> torch.Tensor:
    result = decode_latents(backend, z, scaled=scale is not None, scaling_factor=scale, shift_factor=shift)
    assert result.ok
    return torch.stack(result.outputs)  # type: ignore[arg-type]


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# -- remote_decode -------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_remote_decode_pil(server, local, fmt):
    z = latents(2, 4, 8, 8)
    image = remote_decode(url(server, DECODE), z, scaling_factor=SD_SCALE, image_format=fmt)
    assert isinstance(image, Image.Image) and image.size == (64, 64)
    assert image.format == ("png" if fmt == "png" else "jpeg")
    want = tensor_to_image(local_decode(local["tiny-sd"], z, SD_SCALE, None)[0])  # the first image
    if fmt == "jpg":  # the same JPEG round trip here (noise-like tiny-VAE images lose a lot)
        want = Image.open(io.BytesIO(encode_image(want, "jpg", None, quality=95)))
    assert np.abs(as_array(image) - as_array(want)).max() <= 1


def test_remote_decode_pt_uint8(server, local):
    z = latents(2, 4, 8, 6, seed=1)
    out = remote_decode(
        url(server, DECODE),
        z,
        scaling_factor=SD_SCALE,
        output_type="pt",
        partial_postprocess=True,
        return_type="pt",
    )
    assert out.dtype == torch.uint8 and list(out.shape) == [2, 64, 48, 3]
    want = local_decode(local["tiny-sd"], z, SD_SCALE, None)
    for got, ref in zip(out, want, strict=True):
        assert np.abs(got.numpy().astype(np.int16) - as_array(tensor_to_image(ref))).max() <= 1
    images = remote_decode(
        url(server, DECODE), z, scaling_factor=SD_SCALE, output_type="pt", partial_postprocess=True
    )
    assert len(images) == 2 and all(isinstance(i, Image.Image) for i in images)


@pytest.mark.parametrize(
    ("scale", "shift"),
    [(SD_SCALE, None), (FLUX_SCALE, FLUX_SHIFT), (None, None)],
    ids=["scale", "shift", "raw"],
)
def test_remote_decode_pt_float16(server, local, scale, shift):
    z = latents(3, 4, 6, 8, seed=2)
    out = remote_decode(
        url(server, DECODE),
        z.half(),
        do_scaling=scale is not None,
        scaling_factor=scale,
        shift_factor=shift,
        output_type="pt",
        partial_postprocess=False,
        return_type="pt",
    )
    assert out.dtype == torch.float16 and list(out.shape) == [3, 3, 48, 64]
    want = local_decode(local["tiny-sd"], z.half().float(), scale, shift)
    torch.testing.assert_close(out.float(), want, atol=2e-3, rtol=0)


def test_remote_decode_uses_the_vaes_own_scaling_with_do_scaling(server, local):
    z = latents(1, 4, 8, 8, seed=3)
    out = remote_decode(url(server, DECODE), z, output_type="pt", return_type="pt")  # do_scaling=True
    want = local_decode(local["tiny-sd"], z, local["tiny-sd"].scaling_factor, None)
    torch.testing.assert_close(out.float(), want, atol=2e-3, rtol=0)


def pack(z: torch.Tensor) -> torch.Tensor:
    """diffusers' FluxPipeline._pack_latents."""
    b, c, h, w = z.shape
    z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return z.reshape(b, (h // 2) * (w // 2), c * 4)


def test_remote_decode_packed_flux_latents(server, local):
    z = latents(2, 16, 8, 6, seed=4)
    out = remote_decode(
        url(server, DECODE + "?vae=tiny-flux"),
        pack(z),
        scaling_factor=FLUX_SCALE,
        shift_factor=FLUX_SHIFT,
        height=64,
        width=48,
        output_type="pt",
        return_type="pt",
    )
    want = local_decode(local["tiny-flux"], z, FLUX_SCALE, FLUX_SHIFT)
    torch.testing.assert_close(out.float(), want, atol=2e-3, rtol=0)


# -- remote_encode -------------------------------------------------------------------------------
def test_remote_encode_pil_and_tensor(server, local):
    rgb = (np.random.default_rng(0).random((64, 48, 3)) * 255).astype(np.uint8)
    pixels = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    raw = local["tiny-sd"].encode(to_unit_range(pixels)).mean
    got = remote_encode(url(server, ENCODE), Image.fromarray(rgb))
    assert list(got.shape) == [1, 4, 8, 6]
    torch.testing.assert_close(got, raw, atol=1e-4, rtol=1e-4)
    scaled = remote_encode(
        url(server, ENCODE), Image.fromarray(rgb), scaling_factor=FLUX_SCALE, shift_factor=0.1
    )
    torch.testing.assert_close(scaled, (raw - 0.1) * FLUX_SCALE, atol=1e-4, rtol=1e-4)
    # contiguous: diffusers 0.42's client serialises ``image.contiguous()`` through a pointer into
    # that temporary, which is freed before the bytes are copied (garbage for non-contiguous input)
    unit = (pixels.float() / 255.0).contiguous()
    as_tensor = remote_encode(url(server, ENCODE), unit, scaling_factor=SD_SCALE)
    torch.testing.assert_close(as_tensor, raw * SD_SCALE, atol=1e-4, rtol=1e-4)


# -- errors --------------------------------------------------------------------------------------
def error_of(call) -> dict:
    with pytest.raises(RuntimeError) as info:
        call()
    body = info.value.args[0]
    assert isinstance(body, dict) and body["error"], body
    return body


def test_errors_arrive_as_json(server, monkeypatch):
    endpoint = url(server, DECODE)
    body = error_of(lambda: remote_decode(endpoint, latents(1, 4, 8, 8).double()))
    assert "dtype" in body["error"] and body["detail"]["got"] == "float64"
    body = error_of(
        lambda: remote_decode(endpoint, latents(1, 4, 8, 8), output_type="mp4", return_type="mp4")
    )
    assert "mp4" in body["error"] and "not supported" in body["error"]
    body = error_of(lambda: remote_decode(endpoint, latents(1, 16, 8, 8)))
    assert "16 channels" in body["detail"]
    bad = latents(2, 4, 8, 8)
    bad[1, 0, 0, 0] = float("inf")
    body = error_of(lambda: remote_decode(endpoint, bad, output_type="pt", return_type="pt"))
    assert "sample 1" in body["detail"]
    body = error_of(lambda: remote_decode(endpoint + "?vae=tiny-nan", latents(1, 4, 8, 8)))
    assert body["error"].startswith("sample 0:") and "NaN" in body["error"]
    body = error_of(lambda: remote_decode(endpoint, latents(1, 4, 300, 300)))  # 1 MiB limit
    assert body["error"] == "request too large"

    remote_utils = client()
    real = remote_utils.prepare_decode

    def truncated(**kwargs):
        out = real(**kwargs)
        out["data"] = out["data"][:-2]
        return out

    monkeypatch.setattr(remote_utils, "prepare_decode", truncated)
    body = error_of(lambda: remote_decode(endpoint, latents(1, 4, 8, 8)))
    assert "does not match" in body["error"] and body["detail"]["expected"] == body["detail"]["bytes"] + 2
    body = error_of(lambda: remote_encode(url(server, ENCODE), Image.new("RGB", (4, 4))))
    assert "8x8" in body["detail"]


def test_get_info_and_openapi(server):
    info = requests.get(url(server, DECODE), timeout=30).json()
    assert info["status"] == "ok" and info["vae"] == "tiny-sd" and info["latent_channels"] == 4
    assert requests.get(url(server, ENCODE + "?vae=tiny-flux"), timeout=30).json()["family"] == "flux"
    spec = requests.get(url(server, "/openapi.json"), timeout=30).json()
    op = spec["paths"][DECODE]["post"]
    assert "tensor/binary" in op["requestBody"]["content"]
    names = {p["name"] for p in op["parameters"]}
    assert {"shape", "dtype", "scaling_factor", "shift_factor", "output_type", "height", "width"} <= names
    assert "image/png" in spec["paths"][ENCODE]["post"]["requestBody"]["content"]
    assert "get" in spec["paths"][ENCODE]


# -- RemoteVAE -----------------------------------------------------------------------------------
def test_remote_vae_through_the_engine_equals_a_local_decode(server, local):
    vae = load_vae("remote:" + url(server, DECODE))
    assert isinstance(vae, RemoteVAE) and vae.family.name == "sd1" and vae.family_source == "remote"
    assert not vae.supports_tiling("decode") and vae.encode_url.endswith(ENCODE)
    vae.max_batch = 2
    z = latents(3, 4, 8, 8, seed=6)
    result = decode_latents(vae, z)
    assert result.ok and result.chunk_sizes == [2, 1]
    want = local_decode(local["tiny-sd"], z, SD_SCALE, None)
    torch.testing.assert_close(torch.stack(result.outputs), want, atol=2e-3, rtol=0)  # type: ignore[arg-type]

    pixels = (torch.rand(2, 3, 32, 40, generator=torch.Generator().manual_seed(7)) * 255).to(torch.uint8)
    want_z = encode_pixels(local["tiny-sd"], pixels)
    for mode in ("tensor", "png"):
        remote = RemoteVAE(url(server, "/vaebatch/v1/remote"), family="sd1", encode_as=mode)
        got = encode_pixels(remote, pixels)
        assert got.ok
        torch.testing.assert_close(
            torch.stack(got.outputs), torch.stack(want_z.outputs), atol=1e-4, rtol=1e-4
        )  # type: ignore[arg-type]


class Stub:
    """A tiny HTTP server on 127.0.0.1 answering from a script: a status code per request
    (200: a valid decode answer), and the requests it saw."""

    def __init__(self, script: list[int], port: int = 0) -> None:
        self.script, self.seen = list(script), []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                self.rfile.read(length)
                stub.seen.append(self.path)
                code = stub.script.pop(0) if stub.script else 200
                if code == 200:
                    shape = [int(v) for k, v in _query(self.path) if k == "shape"]
                    b, _, h, w = shape
                    out = torch.zeros(b, 3, h * 8, w * 8, dtype=torch.float16)
                    body, headers = (
                        out.numpy().tobytes(),
                        {"shape": json.dumps(list(out.shape)), "dtype": "float16"},
                    )
                else:
                    body = json.dumps({"error": f"scripted {code}", "detail": None}).encode()
                    headers = {"Content-Type": "application/json"}
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/decode"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _query(path: str) -> list[tuple[str, str]]:
    from urllib.parse import parse_qsl, urlsplit

    return parse_qsl(urlsplit(path).query)


def test_retries_on_5xx_and_refused_connections_but_not_on_4xx():
    z = latents(1, 4, 2, 2)
    stub = Stub([503, 502])
    try:
        delays: list[float] = []
        vae = RemoteVAE(stub.url, family="sd1", backoff=0.5, sleep=delays.append)
        assert vae.decode(z).shape == (1, 3, 16, 16)
        assert len(stub.seen) == 3 and delays == [0.5, 1.0]
        stub.script = [422]
        with pytest.raises(RemoteVAEError, match=r"/decode: HTTP 422: scripted 422") as info:
            vae.decode(z)
        assert info.value.status == 422 and len(stub.seen) == 4
        stub.script = [500] * 5
        with pytest.raises(RemoteVAEError, match=r"HTTP 500: scripted 500 \(after 3 attempts\)"):
            RemoteVAE(stub.url, family="sd1", retries=2, sleep=delays.append).decode(z)
        # through the engine: the sample fails with the server's message, nothing is lost
        stub.script = [422]
        result = decode_latents(vae, z)
        assert not result.ok and "scripted 422" in result.reports[0].message
    finally:
        stub.close()

    port = free_port()
    late: list[Stub] = []
    vae = RemoteVAE(
        f"http://127.0.0.1:{port}/decode", family="sd1", sleep=lambda _s: late or late.append(Stub([], port))
    )
    try:
        assert vae.decode(z).shape == (1, 3, 16, 16)  # refused, then the server is up
        assert len(late) == 1 and len(late[0].seen) == 1
    finally:
        for s in late:
            s.close()


def test_remote_vae_names_the_endpoint_when_nothing_answers():
    vae = RemoteVAE(
        f"http://127.0.0.1:{free_port()}/x/decode", family="sd1", retries=1, sleep=lambda _s: None
    )
    with pytest.raises(RemoteVAEError, match=r"127\.0\.0\.1:\d+/x/decode: cannot connect .*after 2 attempts"):
        vae.decode(latents(1, 4, 2, 2))
    assert load_vae("http://u:p@127.0.0.1:1/vaebatch/v1/remote", family="flux").encode_url.endswith("/encode")


def test_credentials_and_the_built_in_vae(auth_server):
    """--api-auth applies (401 JSON), and the built-in VAE follows 16-channel latents."""
    body = error_of(lambda: remote_decode(url(auth_server, DECODE), latents(1, 4, 8, 8)))
    assert body["error"] == "incorrect or missing credentials"
    endpoint = url(auth_server, DECODE).replace("http://", "http://alice:s3cret@")
    out = remote_decode(
        endpoint, latents(1, 16, 4, 4), scaling_factor=FLUX_SCALE, output_type="pt", return_type="pt"
    )
    assert list(out.shape) == [1, 3, 32, 32]
    vae = load_vae(endpoint)  # credentials from the URL, family from GET
    assert vae.family.name == "sd1" and vae.decode(latents(1, 4, 2, 2)).shape == (1, 3, 16, 16)
