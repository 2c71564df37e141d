"""Webui extension installer: installs the extension's missing dependencies into the webui's Python.

The webui runs it as ``python install.py`` at launch (not at all with ``--skip-install``). It is
self-contained (no imports from the package, no tomllib: it runs on Python 3.10), installs only
packages that are missing *by name* (a version the webui pinned is never upgraded or downgraded),
never installs torch (the webui owns it; torch is also held at its installed version for the pip
call so pip cannot move it), and never fails the webui's start.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
import tempfile
from importlib import metadata

#: Distribution name -> requirement to install when it is missing. Kept equal to pyproject.toml's
#: [project] dependencies minus torch (tests/test_install.py checks).
REQUIREMENTS = {
    "numpy": "numpy>=1.26",
    "pillow": "pillow>=9.5",
    "piexif": "piexif>=1.1.3",
    "safetensors": "safetensors>=0.4.2",
}
NEVER_INSTALL = {"torch"}  # the host webui brings (and pins) its own


def is_installed(name: str) -> bool:
    try:
        metadata.distribution(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def missing() -> list[str]:
    return [req for name, req in REQUIREMENTS.items() if name not in NEVER_INSTALL and not is_installed(name)]


def skip_requested() -> bool:
    args = sys.argv[1:] + shlex.split(os.environ.get("COMMANDLINE_ARGS", ""))
    return "--skip-install" in args or "--skip-prepare-environment" in args


def main() -> int:
    if skip_requested():
        return 0
    wanted = missing()
    if not wanted:
        return 0
    with (
        tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints,
        contextlib.suppress(metadata.PackageNotFoundError),
    ):
        constraints.write(f"torch=={metadata.version('torch')}\n")  # never let pip move torch
    try:
        print(f"[VAE Batch] installing {', '.join(wanted)}", flush=True)
        cmd = [sys.executable, "-m", "pip", "install", "--prefer-binary", "-c", constraints.name, *wanted]
        code = subprocess.call(cmd)
        if code:
            print(f"[VAE Batch] pip exited with {code}; install {' '.join(wanted)} by hand", flush=True)
        return 0  # never stop the webui from starting
    finally:
        os.unlink(constraints.name)


if __name__ == "__main__":
    sys.exit(main())
