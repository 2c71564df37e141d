"""The ComfyUI nodes' options: one table for the node schemas, the checks ComfyUI runs before a
graph starts, and the engine options they turn into. Defaults equal the command line's."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from lib_vaebatch.engine.options import TILE_MODES, EngineOptions
from lib_vaebatch.host import checked_engine_options
from lib_vaebatch.tiling import MIN_TILE

#: Precision ladders by name, as the webui script offers them (without "webui settings").
LADDERS: dict[str, tuple[str, ...]] = {
    "bf16, fp32": ("bf16", "fp32"),
    "fp32": ("fp32",),
    "bf16": ("bf16",),
    "none": (),
}
#: Largest tile side (latent pixels) and chunk cap a node takes: beyond any image ComfyUI makes.
MAX_TILE = 1024
MAX_CHUNK = 4096


@dataclass(frozen=True)
class Option:
    name: str
    kind: Literal["bool", "int", "choice"]
    default: Any
    tooltip: str
    choices: tuple[str, ...] = ()
    minimum: int = 0
    maximum: int = 0


DECODE_OPTIONS: tuple[Option, ...] = (
    Option("nan_check", "bool", True,
           "Check every decoded image for NaN/Inf and decode only the failed ones again, up the "
           "precision ladder (ComfyUI alone saves them black)."),
    Option("ladder", "choice", "bf16, fp32",
           "Precisions a non-finite image is decoded again in, in order (only those more robust "
           "than the VAE's own).", choices=tuple(LADDERS)),
    Option("tiling", "choice", "auto",
           "auto: tiles only where an image does not fit (planned from free memory, or after "
           "running out of memory); always; never.", choices=("auto", "always", "never")),
    Option("tile_mode", "choice", "exact",
           "exact: tiles give the untiled image (whole values spilled to a temporary file, or parts "
           "recomputed, where memory is short); exact-lean: exact, recomputing only; fast: estimated "
           "statistics; auto: exact where it fits, else fast; plain: independent tiles (not exact).",
           choices=TILE_MODES),
    Option("tile_size", "int", 0,
           f"Tile side in latent pixels (image pixels / 8), at least {MIN_TILE}; 0 plans it from "
           "free memory.", minimum=0, maximum=MAX_TILE),
    Option("max_chunk", "int", 0,
           "Most images decoded at once; 0 plans the chunk from free memory.", minimum=0, maximum=MAX_CHUNK),
)  # fmt: skip
#: The encoders take the same options but the NaN ladder's (an encode has no image to check).
ENCODE_OPTIONS: tuple[Option, ...] = tuple(
    o for o in DECODE_OPTIONS if o.name in ("tiling", "tile_mode", "tile_size", "max_chunk")
)


def problem(name: str, value: Any) -> str | None:
    """What is wrong with one option value (None: nothing), in the words ComfyUI shows."""
    option = next((o for o in DECODE_OPTIONS if o.name == name), None)
    if option is None:
        return f"unknown option {name!r}"
    if option.kind == "bool":
        return None if isinstance(value, bool) else f"expected true or false, not {value!r}"
    if option.kind == "choice":
        if value not in option.choices:
            return f"expected one of {', '.join(option.choices)}, not {value!r}"
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        return f"expected a whole number, not {value!r}"
    if not option.minimum <= value <= option.maximum:
        return f"expected {option.minimum}..{option.maximum}, not {value}"
    if name == "tile_size" and 0 < value < MIN_TILE:
        return f"a tile is at least {MIN_TILE} latent pixels (0 plans it), not {value}"
    return None


def validate(values: Mapping[str, Any]) -> str | bool:
    """ComfyUI's ``validate_inputs`` answer: True, or the first problem as ``name: why``."""
    for name, value in values.items():
        if (why := problem(name, value)) is not None:
            return f"{name}: {why}"
    return True


def engine_options(values: Mapping[str, Any]) -> EngineOptions:
    """The engine options of a node's values (missing ones at their defaults)."""
    merged = {o.name: o.default for o in DECODE_OPTIONS} | dict(values)
    if (why := validate(merged)) is not True:
        raise ValueError(why)
    return checked_engine_options(
        {
            "nan_check": bool(merged["nan_check"]),
            "ladder": list(LADDERS[merged["ladder"]]),
            "tiling": merged["tiling"],
            "tile_mode": merged["tile_mode"],
            "tile_size": int(merged["tile_size"]) or None,
            "max_chunk": int(merged["max_chunk"]) or None,
        }
    )
