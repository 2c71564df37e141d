"""The core never imports a host (the webui's ``modules``, Forge's ``backend``/``ldm_patched``/
``modules_forge``) or gradio; only the host sub-packages may: ``webui`` (the webui glue shared by
A1111 and the Forge family), ``forge`` (everything Forge-specific) and ``ui`` (gradio)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lib_vaebatch"
HOST_PACKAGES = {"webui", "forge", "ui"}  # the only places allowed to touch a host / gradio
FORGE_ONLY = {"backend", "ldm_patched", "modules_forge"}  # Forge's own packages
FORBIDDEN = {"modules", "gradio"} | FORGE_ONLY


def _core_files():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] not in HOST_PACKAGES:
            yield path


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module",
            "__import__",
        ):
            roots |= {
                a.value.split(".")[0]
                for a in node.args
                if isinstance(a, ast.Constant) and isinstance(a.value, str)
            }
    return roots


def test_no_core_file_imports_the_webui_or_gradio():
    files = list(_core_files())
    assert len(files) > 15
    offenders = {str(p.relative_to(ROOT)): sorted(_imported_roots(p) & FORBIDDEN) for p in files}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_scan_catches_an_offender(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import importlib\n"
        "def f():\n    from modules import shared\n    import gradio as gr\n"
        "    import backend.memory_management\n    from ldm_patched.modules import sd\n"
        "    importlib.import_module('modules_forge.main_thread')\n"
    )
    assert _imported_roots(bad) >= FORBIDDEN


BLOCKER = """
import importlib, pkgutil, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("modules", "gradio", "backend", "ldm_patched", "modules_forge"):
            raise ImportError(f"core imported {name}")
        return None
sys.meta_path.insert(0, Block())
import lib_vaebatch
count = 0
for info in pkgutil.walk_packages(lib_vaebatch.__path__, "lib_vaebatch."):
    if info.name.split(".")[1] in ("webui", "ui", "__main__"):
        continue
    importlib.import_module(info.name)
    count += 1
import lib_vaebatch.cli
assert lib_vaebatch.cli.main(["demo", "-o", sys.argv[1], "--no-progress"]) == 0
print(count)
"""


def test_every_core_module_imports_and_the_demo_runs_with_webui_and_gradio_blocked(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKER, str(tmp_path / "demo")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip().splitlines()[-1]) > 15


def _imports_lib(path: Path, sub: str) -> list[str]:
    """``lib_vaebatch.<sub>`` imports of a file (any level)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        out += [n for n in names if n == f"lib_vaebatch.{sub}" or n.startswith(f"lib_vaebatch.{sub}.")]
    return out


VERMIN = str(Path(sys.executable).with_name("vermin"))  # its console script, beside the interpreter


def test_code_runs_on_python_3_10():
    """A1111 ships Python 3.10: no syntax or standard-library use beyond it (vermin, static)."""
    targets = ["lib_vaebatch", "install.py", "scripts", "bench", "tests"]
    args = ["-t=3.10-", "--no-tips", "--violations", "--eval-annotations", *targets]
    proc = subprocess.run([VERMIN, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_only_the_webui_sub_package_touches_modules():
    """gradio may appear in the UI sub-package too, but ``modules.*`` only in lib_vaebatch/webui
    and lib_vaebatch/forge, Forge's own packages only in lib_vaebatch/forge, and the argument model
    (args.py) stays importable without a webui."""
    files = sorted(PACKAGE.rglob("*.py"))
    part = {p: p.relative_to(PACKAGE).parts[0] for p in files}
    roots = {p: _imported_roots(p) for p in files}
    offenders = sorted(
        str(p.relative_to(ROOT)) for p in files if part[p] not in ("webui", "forge") and "modules" in roots[p]
    )
    assert offenders == []
    forge_outside = sorted(
        str(p.relative_to(ROOT)) for p in files if part[p] != "forge" and roots[p] & FORGE_ONLY
    )
    assert forge_outside == []
    assert any(roots[p] & FORGE_ONLY for p in files if part[p] == "forge"), (
        "the Forge adapters live in forge/"
    )
    forge_to_glue = sorted(
        str(p.relative_to(ROOT)) for p in files if part[p] == "forge" and _imports_lib(p, "webui")
    )
    assert forge_to_glue == [], "forge/ is below the shared webui glue: it never imports it"
    assert "modules" not in _imported_roots(PACKAGE / "webui" / "args.py")
    scripts_entry = ROOT / "scripts" / "vaebatch.py"
    assert len(scripts_entry.read_text().splitlines()) < 20, "scripts/vaebatch.py stays a thin entry"
