"""``--api-auth``: every extension route, as the server's own OpenAPI lists them (so routes added
later are covered too), answers 401 JSON without the right credentials and works with them; the
request size limit answers 413 JSON."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.hardening.conftest import basic, call, post_large

GOOD = basic("alice", "s3cret")
WRONG = {
    "none": None,
    "wrong-password": basic("alice", "nope"),
    "unknown-user": basic("mallory", "s3cret"),
    "empty-password": basic("alice", ""),
    "password-prefix": basic("alice", "s3cre"),
    "not-base64": "Basic !!!not-base64",
    "no-colon": "Basic " + base64.b64encode(b"alice").decode(),
    "not-utf8": "Basic " + base64.b64encode(b"alice:\xff\xfe").decode(),
    "bearer": "Bearer s3cret",
    "scheme-only": "Basic",
}
TENSOR = {
    "tensor": base64.b64encode(np.zeros((1, 4, 2, 2), np.float32).tobytes()).decode(),
    "shape": [1, 4, 2, 2],
}


def _png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


#: A valid body per known POST route; other routes get a small JSON object (auth comes first).
BODIES: dict[str, Any] = {"/vaebatch/v1/decode": TENSOR, "/vaebatch/v1/encode": {"images": [_png()]}}


@pytest.fixture(scope="module")
def operations(auth_server) -> list[tuple[str, str]]:
    status, spec, _ = call(auth_server, "/openapi.json")
    assert status == 200
    ops = [
        (method.upper(), path)
        for path, item in spec["paths"].items()
        if path.startswith("/vaebatch/")
        for method in item
        if method in ("get", "post", "put", "patch", "delete")
    ]
    assert ("GET", "/vaebatch/v1/info") in ops and ("POST", "/vaebatch/v1/decode") in ops
    return ops


def _request(server, method: str, path: str, auth: str | None) -> tuple[int, Any, dict[str, str]]:
    headers = {} if auth is None else {"Authorization": auth}
    body = BODIES.get(path, {}) if method != "GET" else None
    return call(server, path, body, method=method, headers=headers)


@pytest.mark.parametrize("who", list(WRONG))
def test_every_route_refuses_missing_or_wrong_credentials(auth_server, operations, who) -> None:
    for method, path in operations:
        status, answer, headers = _request(auth_server, method, path, WRONG[who])
        assert status == 401, (method, path, answer)
        assert {k.lower(): v for k, v in headers.items()}.get("www-authenticate") == "Basic", (method, path)


@pytest.mark.parametrize("who", list(WRONG))
def test_refusals_are_our_json_error(auth_server, operations, who) -> None:
    for method, path in operations:
        _, answer, _ = _request(auth_server, method, path, WRONG[who])
        assert answer == {"error": "incorrect or missing credentials", "detail": None}, (method, path)


def test_every_route_works_with_the_right_credentials(auth_server, operations) -> None:
    for method, path in operations:
        status, answer, _ = _request(auth_server, method, path, GOOD)
        assert status != 401 and status < 500, (method, path, status, answer)
    status, info, _ = call(auth_server, "/vaebatch/v1/info", headers={"Authorization": GOOD})
    assert status == 200 and info["vaes"]
    status, decoded, _ = call(auth_server, "/vaebatch/v1/decode", TENSOR, headers={"Authorization": GOOD})
    assert status == 200 and len(decoded["images"]) == 1 and decoded["results"][0]["status"] == "ok"
    status, encoded, _ = call(auth_server, "/vaebatch/v1/encode", BODIES["/vaebatch/v1/encode"],
                              headers={"Authorization": GOOD})  # fmt: skip
    assert status == 200 and encoded["shape"] == [1, 4, 2, 2]


def test_the_size_limit_answers_413_json(auth_server, operations) -> None:
    big = b'{"tensor": "' + b"A" * (1 << 20) + b'"}'
    posts = [path for method, path in operations if method == "POST"]
    assert "/vaebatch/v1/decode" in posts
    for path in posts:
        status, answer = post_large(auth_server, path, big, {"Authorization": GOOD})
        assert status == 413, (path, answer)
        assert answer["error"] == "request too large" and answer["detail"]["limit_bytes"] == 1 << 20, path
        # Without credentials the body is never read: 401, not 413.
        status, answer = post_large(auth_server, path, big)
        assert status == 401, (path, answer)


def test_openapi_declares_basic_auth(auth_server) -> None:
    _, spec, _ = call(auth_server, "/openapi.json")
    assert spec["components"]["securitySchemes"]["HTTPBasic"] == {"type": "http", "scheme": "basic"}
