"""X/Y/Z plot axes for the main options. An axis value also turns the script on for that cell."""

from __future__ import annotations

from typing import Any

from lib_vaebatch.webui import args as A

OVERRIDES_ATTR = "vaebatch_overrides"


def find_xyz_module() -> Any | None:
    from modules import scripts

    for data in scripts.scripts_data:
        if data.script_class.__module__ in ("xyz_grid.py", "scripts.xyz_grid") and hasattr(
            data.module, "AxisOption"
        ):
            return data.module
    return None


def _apply(name: str) -> Any:
    def apply(p: Any, x: Any, xs: Any) -> None:
        overrides = dict(getattr(p, OVERRIDES_ATTR, None) or {})
        overrides[name] = x
        overrides["enabled"] = True
        setattr(p, OVERRIDES_ATTR, overrides)

    return apply


def add_axes() -> None:
    """Idempotent: axes already added (same xyz module instance) are not added again."""
    xyz = find_xyz_module()
    if xyz is None:
        return
    if any(getattr(o, "vaebatch", False) for o in xyz.axis_options):
        return
    for arg in A.ARGS:
        if not arg.axis:
            continue
        kind = int if arg.kind == "int" else str
        choices = (lambda c=arg.choices: list(c)) if arg.kind == "choice" else None
        option = xyz.AxisOption(f"{A.TITLE}: {arg.label}", kind, _apply(arg.name), choices=choices)
        option.vaebatch = True
        xyz.axis_options.append(option)
