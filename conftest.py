"""pytest at the repository root.

The root is also a ComfyUI node pack, so it holds an ``__init__.py``; pytest's default import mode
would take the whole checkout for a package and import every test module as
``<clone folder>.tests.<name>`` (and ``tests/`` twice, under that name and as ``tests``, which the
tests import). Package lookup is kept below the root, so the tests are the ``tests`` package
whatever the clone is called, as they are without the pack's ``__init__.py``.
(tests/test_comfy_pack.py checks it.)
"""

from pathlib import Path

import _pytest.pathlib

_ROOT = Path(__file__).resolve().parent
_find = _pytest.pathlib.resolve_package_path


def _below_root(path: Path) -> Path | None:
    found = _find(path)
    if found is None or found.resolve() != _ROOT:
        return found
    rel = Path(path).resolve().relative_to(_ROOT)
    top = _ROOT / rel.parts[0]
    return top if len(rel.parts) > 1 and (top / "__init__.py").is_file() else None


_pytest.pathlib.resolve_package_path = _below_root
