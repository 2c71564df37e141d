"""VAE Batch as a ComfyUI node pack: the only code that imports ComfyUI (``comfy.*``,
``comfy_api.*``), always inside functions, by capability (never by version string).

* :mod:`.backend`: ComfyUI's ``VAE`` behind the engine's VAE interface, and what stays with
  ComfyUI's own decode (:func:`~.backend.hand_back_reason`);
* :mod:`.glue`: what a node does with a VAE and a batch (ComfyUI's data conventions, progress bar,
  interrupt, the report);
* :mod:`.options`: the nodes' options, their checks and the engine options they become;
* :mod:`.nodes`: the V3 node classes and the extension ComfyUI loads.

The repository root's ``__init__.py`` (what ComfyUI imports from ``custom_nodes/``) calls
:func:`entrypoint`.
"""

from __future__ import annotations

from typing import Any

#: ComfyUI before this has no V3 node API (``comfy_api.latest``, ``comfy_entrypoint``).
NEEDS = "ComfyUI 0.3.47 or newer (its V3 node API, comfy_api.latest)"


def has_v3_api() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("comfy_api.latest") is not None
    except ImportError:  # no comfy_api at all
        return False


async def entrypoint() -> Any:
    """The ``ComfyExtension`` with the pack's nodes."""
    if not has_v3_api():
        raise ImportError(f"VAE Batch needs {NEEDS}")
    from lib_vaebatch.comfy.nodes import extension

    return extension()
