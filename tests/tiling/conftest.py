from __future__ import annotations

import pytest

from tests.support import trained_autoencoder


@pytest.fixture(scope="session")
def trained_vae():
    return trained_autoencoder()
