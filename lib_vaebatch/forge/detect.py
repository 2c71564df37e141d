"""Which Forge, by capability: the backend package that is loaded, never a version string.

* new backend (``backend.memory_management``): lllyasviel's Forge 2 and Forge Neo;
* old backend (``ldm_patched.modules.model_management``): Forge Classic and reForge ``main``.

``modules_forge.forge_version.version`` only labels the variant in console lines and infotext.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from typing import Any, Literal

BackendKind = Literal["new", "old"]

#: The memory-manager module of each backend.
MEMORY_MANAGER = {
    "new": "backend.memory_management",
    "old": "ldm_patched.modules.model_management",
}


@dataclass(frozen=True)
class ForgeHost:
    backend: BackendKind
    #: For people: "Forge Neo", "Forge", "Forge Classic", "reForge" or "Forge (<version>)".
    label: str

    def memory_manager(self) -> Any:
        return importlib.import_module(MEMORY_MANAGER[self.backend])


def _present(name: str) -> bool:
    if name in sys.modules:
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent that is not a package, or a broken spec
        return False


def _label() -> str:
    try:
        version = str(importlib.import_module("modules_forge.forge_version").version)
    except (ImportError, AttributeError):
        return "Forge"
    low = version.lower()
    if low.startswith("neo"):
        return "Forge Neo"
    if low.startswith("classic"):
        return "Forge Classic"
    if low.startswith("2."):
        return "Forge"
    if low.startswith("1.") and "v2" in low:
        return "reForge"
    return f"Forge ({version})"


def detect_host() -> ForgeHost | None:
    """The Forge this process runs in, or None (A1111, standalone). ``modules_forge`` marks the
    family; the loaded backend package decides which adapter drives it."""
    if not _present("modules_forge"):
        return None
    for kind in ("new", "old"):
        if _present(MEMORY_MANAGER[kind]):
            return ForgeHost(kind, _label())  # type: ignore[arg-type]
    return None


def is_forge_model(sd_model: Any) -> bool:
    """A model Forge built: its VAE is ``forge_objects.vae`` (whatever ``first_stage_model`` says:
    None on Forge 2, a property on Neo, the ldm_patched module on Classic and reForge)."""
    objects = getattr(sd_model, "forge_objects", None)
    return objects is not None and getattr(objects, "vae", None) is not None
