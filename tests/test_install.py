"""install.py: self-contained, missing-by-name only, never torch, honours --skip-install."""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
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


def _pyproject_dependencies() -> list[str]:
    # tomllib is 3.11+; A1111's Python 3.10 gets tomli (the test extra pins it there). install.py
    # itself parses neither: it runs inside the webui before anything is installed.
    if sys.version_info >= (3, 11):
        import tomllib  # novermin - guarded by the version check above
    else:
        import tomli as tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def test_requirement_list_matches_pyproject_minus_torch(install):
    deps = [d for d in _pyproject_dependencies() if not d.startswith("torch")]
    assert sorted(install.REQUIREMENTS.values()) == sorted(deps)


def test_self_contained_no_tomllib_no_package_imports():
    tree = ast.parse((ROOT / "install.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "tomllib" not in imported and "lib_vaebatch" not in imported and "launch" not in imported


def test_lower_bounds_admit_the_webui_pins():
    from packaging.requirements import Requirement

    pins = {"numpy": "1.26.2", "pillow": "9.5.0", "safetensors": "0.4.2", "torch": "2.1.2", "piexif": "1.1.3"}
    for dep in _pyproject_dependencies():
        req = Requirement(dep)
        assert req.specifier.contains(pins[req.name.lower()]), dep


def test_installs_only_what_is_missing_by_name_never_upgrades_and_pins_torch(install, monkeypatch):
    calls = []
    monkeypatch.setattr(
        install,
        "REQUIREMENTS",
        {
            "torch": "torch>=99",
            "numpy": "numpy>=999",
            "surely-not-installed-pkg": "surely-not-installed-pkg>=1",
        },
    )
    monkeypatch.delenv("COMMANDLINE_ARGS", raising=False)
    monkeypatch.setattr(sys, "argv", ["install.py"])

    def fake_call(cmd):
        calls.append((cmd, Path(cmd[cmd.index("-c") + 1]).read_text()))
        return 1  # pip failing must not fail the webui's start

    monkeypatch.setattr(install.subprocess, "call", fake_call)
    assert install.main() == 0
    ((cmd, constraints),) = calls
    # numpy is installed (an older version than asked): left alone; torch never.
    assert cmd[-1] == "surely-not-installed-pkg>=1" and not any(
        c.startswith(("torch", "numpy")) for c in cmd[5:]
    )
    assert re.match(r"torch==\d", constraints)


def test_nothing_missing_runs_no_pip(install, monkeypatch):
    monkeypatch.delenv("COMMANDLINE_ARGS", raising=False)
    monkeypatch.setattr(sys, "argv", ["install.py"])
    monkeypatch.setattr(install.subprocess, "call", lambda cmd: pytest.fail(f"ran {cmd}"))
    assert install.main() == 0


def test_skip_install_is_honoured(install, monkeypatch):
    monkeypatch.setenv("COMMANDLINE_ARGS", "--api --skip-install")
    monkeypatch.setattr(install, "missing", lambda: pytest.fail("must not look at packages"))
    assert install.main() == 0


def test_runs_as_a_script_under_the_current_python():
    out = subprocess.run(
        [sys.executable, str(ROOT / "install.py"), "--skip-install"], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stderr == ""
