"""A real standalone server (``python -m lib_vaebatch serve``) on 127.0.0.1 for the API tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.ui.conftest import Server, running_server


@pytest.fixture(scope="module")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The app with the built-in approximate VAE, no auth, the default 64 MiB limit."""
    with running_server(tmp_path_factory.mktemp("api"), "--device", "cpu") as srv:
        yield srv


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The same with --api-auth alice:s3cret and a 1 MiB request limit."""
    with running_server(
        tmp_path_factory.mktemp("api-auth"),
        "--device",
        "cpu",
        "--api-auth",
        "alice:s3cret",
        "--api-max-mb",
        "1",
    ) as srv:
        yield srv


def url(server: Server, path: str) -> str:
    return server.url.rstrip("/") + path


__all__ = ["Server", "url"]
