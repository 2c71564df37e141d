"""A fresh fake ComfyUI for every test, with the pack loaded as ComfyUI loads it."""

from __future__ import annotations

import pytest

from tests.comfy.host import fake_comfy


@pytest.fixture
def comfy():
    with fake_comfy() as host:
        host.load_pack()
        yield host
