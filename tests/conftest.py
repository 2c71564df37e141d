from __future__ import annotations

import os

import pytest
import torch

# The CPU layout probe picks by wall-clock time; tests that compare outputs bit for bit must not
# depend on the machine's load, so every "auto" job here (subprocesses too) runs the module as it
# is. tests/engine/test_layout.py drives the probe with its own tuners and clocks.
os.environ["VAEBATCH_CPU_LAYOUT"] = "contiguous"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
