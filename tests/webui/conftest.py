"""The fake webui, loaded fresh for every test: ``modules`` from tests/webui/fakewebui, the
extension's scripts/ executed the way the webui executes them, UI built for txt2img and img2img."""

from __future__ import annotations

import pytest

from tests.webui.harness import fake_webui


@pytest.fixture
def webui():
    with fake_webui() as host:
        yield host
