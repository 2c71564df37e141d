from __future__ import annotations

import os

import pytest
import torch

# The CPU layout probe picks by wall-clock time; tests that compare outputs bit for bit must not
# depend on the machine's load, so every "auto" job here (subprocesses too) runs the module as it
# is. tests/engine/test_layout.py drives the probe with its own tuners and clocks.
os.environ["VAEBATCH_CPU_LAYOUT"] = "contiguous"
# Likewise one sample per CPU chunk, as the webui's and Forge's own loops decode (the glue tests
# compare with those, infotext included); the engine's CPU chunking by memory is tested where
# tests/engine unsets it (the ``cpu_chunks_by_memory`` fixture).
os.environ["VAEBATCH_CPU_CHUNK"] = "1"

# Under pytest-xdist (./dev.sh test runs -n auto) the workers share the cores: each gets its share
# of torch threads, so N workers do not run N × cores threads that preempt each other.
if (workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)) > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cpu_chunks_by_memory(monkeypatch):
    """The engine's own CPU chunking (memory decides), instead of the suite's one sample at a time."""
    monkeypatch.delenv("VAEBATCH_CPU_CHUNK", raising=False)
