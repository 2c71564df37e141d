"""The hardening tests reuse the API tests' real servers and add a few helpers."""

from __future__ import annotations

import base64
import http.client
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.api.conftest import Server, api_server, auth_server, url  # noqa: F401  (fixtures)


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process (Linux ``/proc``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def call(
    server: Server,
    path: str,
    body: Any = None,
    *,
    method: str | None = None,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 120,
) -> tuple[int, Any, dict[str, str]]:
    """``(status, parsed JSON body, headers)`` of one request; a non-JSON body fails the test."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(
        url(server, path),
        data=data,
        method=method or ("GET" if data is None else "POST"),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, text, hdrs = r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as exc:
        status, text, hdrs = exc.code, exc.read(), dict(exc.headers)
    try:
        parsed = json.loads(text)
    except ValueError:
        raise AssertionError(f"{path}: {status} answered non-JSON {text[:200]!r}") from None
    return status, parsed, hdrs


def post_large(
    server: Server, path: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """POST a body the server may refuse before reading it all (413 on the declared length): the
    server's answer is read even when it closed the connection while the body was being sent."""
    parts = urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.putrequest("POST", path)
        for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
            conn.putheader(key, value)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        try:
            for i in range(0, len(body), 1 << 16):
                conn.send(body[i : i + (1 << 16)])
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused early: the answer is already waiting
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()
