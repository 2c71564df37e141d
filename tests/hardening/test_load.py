"""Bounded concurrency on loopback: 8 clients x 25 decodes against a real server. Every answer
arrives, is complete and belongs to its request (each image equals a local decode of the latents
sent), and the server's memory stays flat."""

from __future__ import annotations

import base64
import io
import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from lib_vaebatch.api import service
from lib_vaebatch.ui.actions import Reporter
from lib_vaebatch.ui.standalone import StandaloneHost
from tests.hardening.conftest import call, rss_bytes

log = logging.getLogger("vaebatch.tests")

CLIENTS, REQUESTS = 8, 25
SHAPE = [1, 4, 16, 16]
MAX_GROWTH = 100 << 20


def payload(n: int) -> dict[str, object]:
    g = torch.Generator().manual_seed(1000 + n)
    t = torch.randn(SHAPE, generator=g).numpy().astype(np.float32)
    return {"tensor": base64.b64encode(t.tobytes()).decode(), "shape": SHAPE}


def pixels(b64png: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64png))).convert("RGB"), dtype=np.int16)


@pytest.mark.slow
def test_concurrent_decodes_are_complete_matched_and_memory_flat(api_server) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        local = StandaloneHost(output_dir=tmp, device="cpu")
        expected = {}
        for n in range(CLIENTS * REQUESTS):
            answer = service.decode(local, payload(n), Reporter())
            expected[n] = (pixels(answer["images"][0]), answer["infotexts"][0])
    # Distinct requests give distinct images, so a mixed-up answer cannot pass.
    assert len({e[0].tobytes() for e in expected.values()}) == len(expected)

    pid = api_server.proc.pid
    rss_start = rss_bytes(pid)
    for n in range(20):  # warm-up: first allocations, caches, thread pool
        assert call(api_server, "/vaebatch/v1/decode", payload(n))[0] == 200
    rss_warm = rss_bytes(pid)

    def client(c: int) -> list[tuple[int, int, dict[str, object]]]:
        got = []
        for i in range(REQUESTS):
            n = c * REQUESTS + i
            status, answer, _ = call(api_server, "/vaebatch/v1/decode", payload(n))
            got.append((n, status, answer))
        return got

    t0 = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = [r for rs in pool.map(client, range(CLIENTS)) for r in rs]
    wall = time.perf_counter() - t0
    rss_end = rss_bytes(pid)

    assert len(results) == CLIENTS * REQUESTS
    assert sorted(n for n, _, _ in results) == list(range(CLIENTS * REQUESTS))
    for n, status, answer in results:
        assert status == 200, answer
        assert len(answer["images"]) == 1 and answer["results"][0]["status"] == "ok"
        image, text = expected[n]
        got = pixels(answer["images"][0])
        assert got.shape == image.shape == (128, 128, 3)
        assert int(np.abs(got - image).max()) <= 1, n  # same code; float rounding at most
        assert answer["infotexts"][0] == text
    rate = len(results) / wall
    log.warning(
        "load: %d requests in %.2f s (%.1f req/s); server RSS %.1f MiB at start, %.1f after warm-up, "
        "%.1f at end",
        len(results), wall, rate, rss_start / 2**20, rss_warm / 2**20, rss_end / 2**20,
    )  # fmt: skip
    print(f"LOAD wall={wall:.2f}s rate={rate:.1f}/s rss_start={rss_start >> 20}MiB "
          f"rss_warm={rss_warm >> 20}MiB rss_end={rss_end >> 20}MiB")  # fmt: skip
    assert rss_end - rss_warm < MAX_GROWTH
