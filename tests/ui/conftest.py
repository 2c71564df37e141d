"""A real standalone server (``python -m lib_vaebatch serve``) on 127.0.0.1 for the UI tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    out: Path
    proc: subprocess.Popen[bytes]
    log: Path


def start_server(tmp: Path, *args: str, python: str = sys.executable, timeout: float = 120.0) -> Server:
    port = free_port()
    out = tmp / "out"
    log = tmp / "server.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [python, "-m", "lib_vaebatch", "serve", "--port", str(port), "-o", str(out), *args],
            cwd=tmp,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return Server(url, out, proc, log)
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"server did not answer in {timeout:.0f} s:\n{log.read_text()}")


def stop_server(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(10)
    except subprocess.TimeoutExpired:
        server.proc.kill()


@contextlib.contextmanager
def running_server(tmp: Path, *args: str, python: str = sys.executable) -> Iterator[Server]:
    """``start_server`` for the length of a ``with`` block (fixtures yield from it)."""
    srv = start_server(tmp, *args, python=python)
    try:
        yield srv
    finally:
        stop_server(srv)


@pytest.fixture
def tiny_vae_dir(tmp_path: Path) -> Path:
    """A folder holding one real tiny diffusers VAE (seeded), offered in the app's VAE list."""
    from tests.support import tiny_autoencoder

    vaes = tmp_path / "vaes"
    tiny_autoencoder(seed=3).save_pretrained(vaes / "tiny-vae", safe_serialization=True)
    return vaes


@pytest.fixture
def server(tmp_path: Path, tiny_vae_dir: Path) -> Iterator[Server]:
    with running_server(tmp_path, "--vae-dir", str(tiny_vae_dir), "--device", "cpu") as srv:
        yield srv
