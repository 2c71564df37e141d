"""The core never imports a host (the webui's ``modules``, Forge's ``backend``/``ldm_patched``/
``modules_forge``, ComfyUI's ``comfy``/``comfy_api``/...) or gradio; only the host sub-packages may:
``webui`` (the webui glue shared by A1111 and the Forge family), ``forge`` (everything
Forge-specific), ``comfy`` (the ComfyUI nodes) and ``ui`` (gradio).
The package's modules import each other in layers, without cycles (see LAYERS)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lib_vaebatch"
HOST_PACKAGES = {"webui", "forge", "comfy", "ui"}  # the only places allowed to touch a host / gradio
FORGE_ONLY = {"backend", "ldm_patched", "modules_forge"}  # Forge's own packages
#: ComfyUI's top-level modules (its packages and the main-folder modules a pack could import)
COMFY_ONLY = {"comfy", "comfy_api", "comfy_execution", "comfy_extras", "folder_paths", "nodes", "server",
              "execution", "node_helpers", "latent_preview"}  # fmt: skip
FORBIDDEN = {"modules", "gradio"} | FORGE_ONLY | COMFY_ONLY


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
        "    import comfy.model_management, comfy_api.latest, comfy_execution, comfy_extras, folder_paths\n"
        "    import nodes, server, execution, node_helpers, latent_preview\n"
    )
    assert _imported_roots(bad) >= FORBIDDEN


BLOCKER = """
import importlib, pkgutil, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("modules", "gradio", "backend", "ldm_patched", "modules_forge", "comfy",
                                  "comfy_api", "folder_paths", "nodes", "server"):
            raise ImportError(f"core imported {name}")
        return None
sys.meta_path.insert(0, Block())
import lib_vaebatch
count = 0
for info in pkgutil.walk_packages(lib_vaebatch.__path__, "lib_vaebatch."):
    if info.name.split(".")[1] in ("webui", "ui", "comfy", "__main__"):
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
    targets = ["lib_vaebatch", "install.py", "scripts", "bench", "tests", "__init__.py", "conftest.py"]
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
    comfy_outside = sorted(
        str(p.relative_to(ROOT)) for p in files if part[p] != "comfy" and roots[p] & COMFY_ONLY
    )
    assert comfy_outside == [], "ComfyUI is imported only by lib_vaebatch/comfy"
    assert any(roots[p] & {"comfy", "comfy_api"} for p in files if part[p] == "comfy")
    forge_to_glue = sorted(
        str(p.relative_to(ROOT)) for p in files if part[p] == "forge" and _imports_lib(p, "webui")
    )
    assert forge_to_glue == [], "forge/ is below the shared webui glue: it never imports it"
    assert "modules" not in _imported_roots(PACKAGE / "webui" / "args.py")
    scripts_entry = ROOT / "scripts" / "vaebatch.py"
    assert len(scripts_entry.read_text().splitlines()) < 20, "scripts/vaebatch.py stays a thin entry"


# -- layering ---------------------------------------------------------------------------------
#: Lowest first. A module may import modules of its own layer or a lower one, never a higher one;
#: every module belongs to the layer of its longest matching name (``ui.actions`` before ``ui``).
#: ``host`` is the seam every front end implements (Host, Reporter, UserError, checked options):
#: the HTTP API, the Latent Batch tab's gradio-free actions (``ui.actions``/``ui.standalone``), the
#: gradio pages, the webui glue and the ComfyUI nodes all sit above it and beside each other.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core utilities", ("", "log", "progress", "naming", "images", "infotext", "tensorfile",
                        "ptfile", "families", "devices", "layout", "heap")),
    ("files and tiling", ("tiling", "latents", "saving", "writer")),
    ("backends", ("backends",)),
    ("engine", ("engine",)),
    ("Forge adapters", ("forge",)),  # Forge's VAE behind the engine; below the shared webui glue
    ("jobs", ("jobs", "demo", "cache")),  # cache/: dataset latent caches, on the engine as jobs are
    ("host seam", ("host",)),
    ("api", ("api",)),
    ("tab actions", ("ui.actions", "ui.standalone")),
    ("front ends", ("ui", "webui", "comfy", "cli", "__main__")),
]  # fmt: skip


def _module_name(root: Path, path: Path) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Which modules of the package at ``root`` each of its modules imports (statically, with ast):
    module level and inside functions, ``TYPE_CHECKING`` blocks, relative imports and
    ``importlib.import_module("...")``. A submodule's implicit import of its parent package is not
    an edge; ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to
    ``pkg``."""
    files = {_module_name(root, p): p for p in sorted(root.rglob("*.py"))}

    def known(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        targets: list[str] = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    source = node.module or ""
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    targets.append(sub if sub in files else source)
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module",
                "__import__",
            ):
                targets += [
                    a.value for a in node.args[:1] if isinstance(a, ast.Constant) and isinstance(a.value, str)
                ]
        inside = (t for t in targets if t == root.name or t.startswith(root.name + "."))
        graph[mod] = {k for k in map(known, inside) if k is not None and k != mod}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def layer_of(module: str, package: str = "lib_vaebatch") -> int | None:
    rel = module.removeprefix(package).removeprefix(".")
    best: tuple[int, int] | None = None  # (length of the matching name, layer)
    for rank, (_title, names) in enumerate(LAYERS):
        for name in names:
            matches = rel == name or (bool(name) and rel.startswith(name + "."))
            if matches and (best is None or len(name) > best[0]):
                best = (len(name), rank)
    return None if best is None else best[1]


def upward_imports(graph: dict[str, set[str]], package: str = "lib_vaebatch") -> list[str]:
    out = []
    for mod in sorted(graph):
        for dep in sorted(graph[mod]):
            low, high = layer_of(mod, package), layer_of(dep, package)
            if low is not None and high is not None and high > low:
                out.append(f"{mod} ({LAYERS[low][0]}) imports {dep} ({LAYERS[high][0]})")
    return out


def test_the_package_has_no_import_cycles():
    graph = import_graph(PACKAGE)
    assert len(graph) > 40 and "lib_vaebatch.api.http" in graph["lib_vaebatch.api.remote"]
    assert import_cycles(graph) == []


def test_imports_follow_the_layers():
    """core utilities < files and tiling < backends < engine < jobs < host seam < api < tab actions
    < front ends (see LAYERS); every module has a layer, and in particular backends never import
    the engine."""
    graph = import_graph(PACKAGE)
    assert sorted(m for m in graph if layer_of(m) is None) == []
    assert upward_imports(graph) == []
    backends = [m for m in graph if m.startswith("lib_vaebatch.backends")]
    assert len(backends) >= 5
    assert {m: sorted(d for d in graph[m] if d.startswith("lib_vaebatch.engine")) for m in backends} == {
        m: [] for m in backends
    }


def test_every_host_plugs_into_the_seam_not_into_another_host():
    """The HTTP API and the ComfyUI nodes import no other host folder, and the seam none at all; the
    front ends that serve the HTTP API mount it (the app's server, the webui), and the webui glue
    uses Forge's adapters and the gradio tab."""
    graph = import_graph(PACKAGE)
    hosts = ("api", "ui", "webui", "forge", "comfy")

    def folder(mod: str) -> str | None:
        part = mod.split(".")[1] if mod.count(".") else ""
        return part if part in hosts else None

    allowed = {("webui", "forge"), ("webui", "ui"), ("webui", "api"), ("ui", "api")}
    crossings = sorted(
        f"{mod} imports {dep}"
        for mod, deps in graph.items()
        for dep in deps
        if folder(mod)
        and folder(dep)
        and folder(mod) != folder(dep)
        and (folder(mod), folder(dep)) not in allowed
    )
    assert crossings == []
    assert not any(folder(d) for d in graph["lib_vaebatch.host"]), "the seam is below every host"
    users = {folder(m) for m, deps in graph.items() if "lib_vaebatch.host" in deps}
    assert {"api", "ui", "webui", "comfy"} <= users


def _package(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "lib_vaebatch"
    for rel, text in {"__init__.py": "", **files}.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    return pkg


def test_the_layer_checks_catch_a_planted_cycle_and_an_upward_import(tmp_path):
    pkg = _package(
        tmp_path,
        {
            "backends/__init__.py": "from lib_vaebatch.backends.base import X\n",
            "backends/base.py": "def f():\n    from lib_vaebatch.engine import runner\n",
            "engine/__init__.py": "",
            "engine/runner.py": "from ..backends import base\nfrom . import planner\n",
            "engine/planner.py": "import importlib\nimportlib.import_module('lib_vaebatch.families')\n",
            "families.py": "import torch\nimport lib_vaebatch.jobs\n",
            "jobs.py": "def g():\n    from lib_vaebatch import families\n",
        },
    )
    graph = import_graph(pkg)
    assert graph["lib_vaebatch.backends"] == {"lib_vaebatch.backends.base"}  # not its own package
    assert graph["lib_vaebatch.engine.runner"] == {
        "lib_vaebatch.backends.base",
        "lib_vaebatch.engine.planner",
    }
    assert graph["lib_vaebatch.engine.planner"] == {"lib_vaebatch.families"}
    assert sorted(import_cycles(graph)) == [
        ["lib_vaebatch.backends.base", "lib_vaebatch.engine.runner"],  # function-level, relative
        ["lib_vaebatch.families", "lib_vaebatch.jobs"],
    ]
    assert upward_imports(graph) == [
        "lib_vaebatch.backends.base (backends) imports lib_vaebatch.engine.runner (engine)",
        "lib_vaebatch.families (core utilities) imports lib_vaebatch.jobs (jobs)",
    ]
    # Without the planted imports the same package is clean.
    (pkg / "backends" / "base.py").write_text("X = 1\n")
    (pkg / "families.py").write_text("import torch\n")
    graph = import_graph(pkg)
    assert import_cycles(graph) == [] and upward_imports(graph) == []


def test_importing_the_package_never_imports_ray():
    """Ray is an optional extra: only ``cache --ray`` imports it, inside a function."""
    code = (
        "import sys, importlib, pkgutil, lib_vaebatch\n"
        "for info in pkgutil.walk_packages(lib_vaebatch.__path__, 'lib_vaebatch.'):\n"
        "    if info.name.split('.')[1] not in ('webui', 'ui', 'forge', '__main__'):\n"
        "        importlib.import_module(info.name)\n"
        "import lib_vaebatch.cli, lib_vaebatch.cache.on_ray\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
