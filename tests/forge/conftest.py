"""Fake Forge hosts, one per variant (Forge, Neo, Classic, reForge), loaded fresh for every test:
the fake webui's ``modules`` given the variant's decode path, Forge's own packages beside it, and
a tiny SD1 model built the way that variant builds it."""

from __future__ import annotations

import contextlib

import pytest

from tests.forge import hosts
from tests.webui.harness import fake_webui


@contextlib.contextmanager
def _host(name: str, *, initial_placeholder: bool = False):
    variant = hosts.VARIANTS[name]

    def setup():
        hosts.forgeify(variant)
        if initial_placeholder:
            return hosts.FakeInitialModel()
        return hosts.build_model(variant)

    with fake_webui(variant.paths, setup=setup) as host:
        host.variant = variant
        host.mm = hosts.memory_manager(variant)
        try:
            yield host
        finally:
            hosts.teardown()


@pytest.fixture(params=list(hosts.VARIANTS))
def forge(request):
    with _host(request.param) as host:
        yield host


@pytest.fixture(params=["forge", "classic"])
def forge_pair(request):
    """One variant per backend, for the slower tests."""
    with _host(request.param) as host:
        yield host


@pytest.fixture(params=["neo", "forge", "classic"])
def forge_fresh(request):
    """Forge 2 / Neo just started: ``shared.sd_model`` is a placeholder until the first load
    (Classic loads as A1111 does: its model is there)."""
    with _host(request.param, initial_placeholder=request.param != "classic") as host:
        yield host


@pytest.fixture
def webui():
    """The A1111 fake, for the checks that Forge detection leaves A1111 alone."""
    with fake_webui() as host:
        yield host
