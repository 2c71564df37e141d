"""install.py: dependencies from pyproject, never torch, honours --skip-install."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def install(monkeypatch):
    spec = importlib.util.spec_from_file_location("vaebatch_install", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reads_dependencies_with_and_without_tomllib(install, monkeypatch):
    deps = install.read_dependencies(ROOT / "pyproject.toml")
    assert {re.split(r"[<>=]", d)[0] for d in deps} == {"torch", "numpy", "pillow", "piexif", "safetensors"}
    monkeypatch.setitem(sys.modules, "tomllib", None)  # what Python 3.10 sees
    assert install.read_dependencies(ROOT / "pyproject.toml") == deps


def test_lower_bounds_admit_the_webui_pins(install):
    from packaging.requirements import Requirement

    pins = {"numpy": "1.26.2", "pillow": "9.5.0", "safetensors": "0.4.2", "torch": "2.1.2", "piexif": "1.1.3"}
    for dep in install.read_dependencies(ROOT / "pyproject.toml"):
        req = Requirement(dep)
        assert req.specifier.contains(pins[req.name.lower()]), dep


def test_installs_only_what_is_missing_and_pins_torch(install, monkeypatch):
    calls = []
    monkeypatch.setattr(
        install, "read_dependencies", lambda _p: ["torch>=2.1", "numpy>=1.0", "surely-not-installed-pkg>=1"]
    )
    monkeypatch.delenv("COMMANDLINE_ARGS", raising=False)
    monkeypatch.setattr(sys, "argv", ["install.py"])

    def fake_call(cmd):
        calls.append((cmd, Path(cmd[cmd.index("-c") + 1]).read_text()))
        return 0

    monkeypatch.setattr(install.subprocess, "call", fake_call)
    assert install.main() == 0
    ((cmd, constraints),) = calls
    assert cmd[-1] == "surely-not-installed-pkg>=1" and "torch>=2.1" not in cmd and "numpy>=1.0" not in cmd
    assert re.match(r"torch==\d", constraints)


def test_skip_install_is_honoured(install, monkeypatch):
    monkeypatch.setenv("COMMANDLINE_ARGS", "--api --skip-install")
    monkeypatch.setattr(install, "read_dependencies", lambda _p: pytest.fail("must not read dependencies"))
    assert install.main() == 0
