"""The /vaebatch/v1 routes inside the (fake) webui: registered once on on_app_started, --api-auth
honoured (the webui does not protect extension routes itself), work under the queue lock and
shared.state, size limit from Settings."""

from __future__ import annotations

import base64

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient


@pytest.fixture
def app(webui, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = FastAPI()
    webui.callbacks.app_started_callback(None, app)
    webui.callbacks.app_started_callback(None, app)  # Reload UI runs it again on the same app
    return app


def tensor_payload(t: torch.Tensor) -> dict:
    return {
        "tensor": base64.b64encode(t.numpy().tobytes()).decode(),
        "shape": list(t.shape),
        "dtype": "float32",
    }


def test_routes_are_registered_once(app):
    routes = [(r.path, tuple(sorted(r.methods))) for r in app.routes if r.path.startswith("/vaebatch/")]
    assert len(set(routes)) == len(routes) and ("/vaebatch/v1/decode", ("POST",)) in routes


def test_decode_runs_under_the_queue_lock_and_shared_state(webui, app, monkeypatch):
    from modules import call_queue

    from lib_vaebatch.api import service

    seen = {}
    real = service.decode

    def spy(host, payload, report):
        seen["locked"] = call_queue.queue_lock.locked()
        seen["job"] = webui.shared.state.job
        return real(host, payload, report)

    monkeypatch.setattr(service, "decode", spy)
    t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    r = TestClient(app).post("/vaebatch/v1/decode", json=tensor_payload(t))
    assert r.status_code == 200, r.text
    assert seen == {"locked": True, "job": "vaebatch_decode"}
    assert [x["status"] for x in r.json()["results"]] == ["ok", "ok"]
    assert "VAE Batch VAE: webui VAE" in r.json()["infotexts"][0]
    assert webui.shared.state.job_count == 0  # state.end() ran


def test_api_auth_is_honoured_on_every_route(webui, app):
    webui.shared.cmd_opts.api_auth = "alice:s3cret,bob:pw"
    client = TestClient(app)
    t = torch.randn(1, 4, 8, 8)
    for method, path, kw in (
        ("get", "/vaebatch/v1/info", {}),
        ("post", "/vaebatch/v1/decode", {"json": tensor_payload(t)}),
    ):
        assert getattr(client, method)(path, **kw).status_code == 401
        assert getattr(client, method)(path, auth=("alice", "wrong"), **kw).status_code == 401
        r = getattr(client, method)(path, auth=("bob", "pw"), **kw)
        assert r.status_code == 200, r.text
    r = client.get("/vaebatch/v1/info")
    assert r.json()["error"] and r.headers["www-authenticate"] == "Basic"


def test_request_size_limit_comes_from_settings(webui, app):
    webui.shared.opts.data["vaebatch_api_max_mb"] = 1
    t = torch.randn(1, 4, 128, 128)  # 256 KiB raw, ~350 KiB base64: fits
    client = TestClient(app)
    assert client.post("/vaebatch/v1/decode", json=tensor_payload(t)).status_code == 200
    big = torch.randn(1, 4, 256, 512)  # 2 MiB raw
    r = client.post("/vaebatch/v1/decode", json=tensor_payload(big))
    assert r.status_code == 413 and r.json()["detail"]["limit_bytes"] == 1 << 20
