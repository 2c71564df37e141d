"""The same checkout is a ComfyUI node pack: its root ``__init__.py`` is inert until ComfyUI asks for
the nodes, and changes nothing for pytest, ``pip install`` or the webui; the packaging ComfyUI-Manager
and the Comfy Registry read is there."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

if sys.version_info >= (3, 11):
    import tomllib  # novermin - guarded by the version check
else:
    import tomli as tomllib


def test_pytest_still_imports_the_tests_as_the_tests_package():
    """The root conftest keeps pytest's package search below the root's ``__init__.py``."""
    assert __name__ == "tests.test_comfy_pack"
    assert sys.modules["tests"].__file__ == str(ROOT / "tests" / "__init__.py")


IMPORT_CHILD = r"""
import importlib.util, json, sys
before_path, before_mods = list(sys.path), set(sys.modules)
spec = importlib.util.spec_from_file_location("sd_webui_vae_batch", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
new = sorted(m for m in set(sys.modules) - before_mods
             if m.split(".")[0] in ("lib_vaebatch", "torch", "comfy"))
print(json.dumps({"path_changed": sys.path != before_path, "new": new,
                  "names": sorted(n for n in vars(mod) if not n.startswith("_"))}))
"""


def test_importing_the_root_does_nothing_but_define_the_entry():
    import json

    args = [sys.executable, "-c", IMPORT_CHILD, str(ROOT / "__init__.py")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd="/")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    names = ["WEB_DIRECTORY", "comfy_entrypoint", "logging", "os", "sys"]
    assert out == {"path_changed": False, "new": [], "names": names}, out


def test_the_entry_refuses_a_comfyui_without_the_v3_api():
    import asyncio

    spec = importlib.util.spec_from_file_location("vaebatch_pack_probe", ROOT / "__init__.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(ImportError, match=r"needs ComfyUI 0\.3\.47 or newer"):
        asyncio.run(mod.comfy_entrypoint())  # no comfy_api here


def test_packaging_for_comfyui_manager_and_the_registry():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    comfy = meta["tool"]["comfy"]
    assert comfy["DisplayName"] == "VAE Batch" and comfy["PublisherId"]
    assert comfy["requires-comfyui"] == ">=0.3.47"
    assert comfy["web"] == "web" and (ROOT / "web" / "vaebatch.js").is_file()
    reqs = [
        r.strip() for r in (ROOT / "requirements.txt").read_text().splitlines() if r.strip() and r[0] != "#"
    ]
    deps = [d for d in meta["project"]["dependencies"] if not d.startswith("torch")]
    assert reqs == deps, "ComfyUI-Manager installs requirements.txt: the package's dependencies, never torch"


def test_the_webui_never_loads_comfyuis_script():
    """A1111 and Forge load every .js in javascript/; ComfyUI's front-end script lives in web/."""
    for js in (ROOT / "javascript").glob("*.js"):
        text = js.read_text()
        assert "scripts/app.js" not in text and "registerExtension" not in text, js


def _can_build_wheels() -> bool:
    """setuptools with bdist_wheel here (built in from 70.1, else the wheel package)."""
    from importlib import metadata

    try:
        major, minor = (int(x) for x in metadata.version("setuptools").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _can_build_wheels(), reason="no setuptools with bdist_wheel in this environment")
def test_the_wheel_holds_the_package_only(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"lib_vaebatch"}, tops
    assert "lib_vaebatch/comfy/nodes.py" in names


def test_the_example_workflows_use_the_nodes_and_load_without_schema_warnings():
    """ComfyUI lists a pack's ``example_workflows/`` among its templates; the front end checks each
    against its workflow schema, which refuses ``null`` for the lists and slot indices."""
    import json

    found = set()
    for path in sorted((ROOT / "example_workflows").glob("*.json")):
        wf = json.loads(path.read_text())

        def nulls(x, at=""):
            if x is None:
                yield at
            elif isinstance(x, dict):
                for k, v in x.items():
                    yield from nulls(v, f"{at}.{k}")
            elif isinstance(x, list):
                for i, v in enumerate(x):
                    yield from nulls(v, f"{at}[{i}]")

        assert list(nulls(wf)) == [], path
        types = {n["type"] for n in wf["nodes"]}
        found |= types
        ids = {n["id"] for n in wf["nodes"]}
        assert all(link[1] in ids and link[3] in ids for link in wf["links"]), path
    assert {"VAEBatchDecode", "VAEBatchEncode", "VAEBatchEncodeImages"} <= found
