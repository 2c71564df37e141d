"""The mutation-testing entry's maps (tests/mutate.py) name paths that exist, cover every package
of lib_vaebatch, and give mutmut a configuration it reads."""

from __future__ import annotations

import configparser
from pathlib import Path

from tests import mutate

ROOT = Path(__file__).resolve().parents[1]


def test_every_mapped_path_exists_and_every_package_is_covered():
    for prefix, tests in mutate.COVERING.items():
        assert (ROOT / prefix).exists(), prefix
        assert all((ROOT / t).exists() for t in tests), tests
    for test in [*mutate.CHILD_PROCESS_TESTS, *mutate.SKIP]:
        assert (ROOT / test.split("::")[0]).exists(), test
    packages = [p for p in (ROOT / "lib_vaebatch").iterdir() if (p / "__init__.py").exists()]
    uncovered = [
        p.name for p in packages if not any(k.startswith(f"lib_vaebatch/{p.name}/") for k in mutate.COVERING)
    ]
    assert uncovered == [], "a package without its tests in COVERING"
    assert mutate.covering(["lib_vaebatch/heap.py"]) == mutate.COVERING["lib_vaebatch/heap.py"]
    assert mutate.covering(["lib_vaebatch/naming.py"]) == ["tests/test_naming.py"]


def test_the_configuration_lists_the_paths_tests_and_isolation():
    text = mutate._config(["lib_vaebatch/tiling/", "lib_vaebatch/heap.py"], ["tests/tiling"])
    cfg = configparser.ConfigParser()
    cfg.read_string(text)
    m = cfg["mutmut"]
    assert m["only_mutate"].split() == ["lib_vaebatch/tiling/*", "lib_vaebatch/heap.py"]
    assert m["pytest_add_cli_args_test_selection"].split() == ["tests/tiling"]
    assert m["process_isolation"] == "forkserver"
    assert "no:xdist" in m["pytest_add_cli_args"].split()
