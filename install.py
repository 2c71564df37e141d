"""Webui extension installer: installs the extension's missing dependencies into the webui's Python.

Run by the webui as ``python install.py`` at launch (skipped with ``--skip-install``). It reads the
dependency list from pyproject.toml, never installs or upgrades torch (the webui owns it: torch is
pinned to the installed version for every pip call), and imports nothing from the package.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
NEVER_INSTALL = {"torch"}  # the host webui brings (and pins) its own


def read_dependencies(pyproject: Path) -> list[str]:
    """``[project] dependencies`` from pyproject.toml (tomllib where available, else a small parser)."""
    text = pyproject.read_text(encoding="utf-8")
    try:
        import tomllib  # novermin - Python >= 3.11; the fallback below serves 3.10
    except ImportError:
        section = re.search(r"^\[project\]\s*$(.*?)(?=^\[)", text, re.DOTALL | re.MULTILINE)
        body = section.group(1) if section else ""
        deps = re.search(r"^dependencies\s*=\s*\[(.*?)\]", body, re.DOTALL | re.MULTILINE)
        return re.findall(r'"([^"]+)"', deps.group(1)) if deps else []
    return list(tomllib.loads(text).get("project", {}).get("dependencies", []))


def _name(spec: str) -> str:
    return re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].strip()


def needs_install(spec: str) -> bool:
    """True when the requirement is missing or its installed version does not satisfy it."""
    try:
        installed = metadata.version(_name(spec))
    except metadata.PackageNotFoundError:
        return True
    try:
        from packaging.requirements import Requirement
    except ImportError:  # no packaging: presence is all we can check
        return False
    return not Requirement(spec).specifier.contains(installed, prereleases=True)


def skip_requested() -> bool:
    args = sys.argv[1:] + shlex.split(os.environ.get("COMMANDLINE_ARGS", ""))
    return "--skip-install" in args or "--skip-prepare-environment" in args


def main() -> int:
    if skip_requested():
        return 0
    wanted = [d for d in read_dependencies(HERE / "pyproject.toml") if _name(d).lower() not in NEVER_INSTALL]
    missing = [d for d in wanted if needs_install(d)]
    if not missing:
        return 0
    with (
        tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints,
        contextlib.suppress(metadata.PackageNotFoundError),
    ):
        constraints.write(f"torch=={metadata.version('torch')}\n")  # never let pip move torch
    try:
        print(f"[VAE Batch] installing {', '.join(missing)}")
        cmd = [sys.executable, "-m", "pip", "install", "--prefer-binary", "-c", constraints.name, *missing]
        return subprocess.call(cmd)
    finally:
        os.unlink(constraints.name)


if __name__ == "__main__":
    sys.exit(main())
