"""The one argument model of the "VAE Batch" script.

Everything that names an option comes from :data:`ARGS`: the order of the script's arguments (the
webui API's positional ``alwayson_scripts`` ``args``), the gradio element ids, the Settings keys that
hold the defaults, the infotext labels that "paste" reads back, the hover help (javascript/) and the
X/Y/Z plot axes. This module imports neither ``modules`` nor gradio, so the API docs, the tests and
the standalone tools can use it too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from lib_vaebatch.engine.options import EngineOptions

TITLE = "VAE Batch"
#: Settings section id and label.
SECTION = ("vae_batch", TITLE)
#: Prefix of every setting key.
SETTING_PREFIX = "vaebatch_"
#: Console prefix.
LOG_PREFIX = "[VAE Batch]"

Kind = Literal["bool", "int", "choice"]

LADDERS: dict[str, tuple[str, ...] | None] = {
    # None: from the webui's settings (auto_vae_precision_bfloat16, then auto_vae_precision)
    "webui settings": None,
    "bf16, fp32": ("bf16", "fp32"),
    "fp32": ("fp32",),
    "bf16": ("bf16",),
    "none": (),
}


@dataclass(frozen=True)
class Arg:
    """One script argument."""

    name: str
    label: str
    kind: Kind
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    minimum: int = 0
    maximum: int = 0
    step: int = 1
    #: Infotext label written when the value differs from the default ("" = never written).
    infotext: str = ""
    #: Offered as an X/Y/Z plot axis.
    axis: bool = False

    @property
    def setting_key(self) -> str:
        return f"{SETTING_PREFIX}{self.name}"

    @property
    def elem_suffix(self) -> str:
        """The script-relative element id (the webui prefixes ``script_<tab>_vae_batch_``)."""
        return self.name

    def coerce(self, value: Any) -> Any:
        """A value from the UI, the API, an X/Y/Z axis or pasted infotext, checked and typed."""
        if self.kind == "bool":
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("true", "on", "yes", "1"):
                    return True
                if low in ("false", "off", "no", "0", ""):
                    return False
                raise ValueError(f"{TITLE}: {self.label}: expected true or false, not {value!r}")
            return bool(value)
        if self.kind == "int":
            try:
                number = int(float(value))
            except (TypeError, ValueError):
                raise ValueError(f"{TITLE}: {self.label}: expected a whole number, not {value!r}") from None
            if not self.minimum <= number <= self.maximum:
                raise ValueError(f"{TITLE}: {self.label}: {number} is outside {self.minimum}..{self.maximum}")
            return number
        text = str(value).strip()
        for choice in self.choices:
            if text.lower() == choice.lower():
                return choice
        raise ValueError(f"{TITLE}: {self.label}: {value!r} is not one of {', '.join(self.choices)}")


ARGS: tuple[Arg, ...] = (
    Arg("enabled", "VAE Batch", "bool", False,
        "Decode every image of this generation (hires fix included) with VAE Batch: chunks sized "
        "from free memory, NaN/Inf check of every image with recovery of only the failed ones, "
        "out-of-memory recovery that keeps finished images."),
    Arg("chunk", "Max chunk (0 = auto)", "int", 0,
        "Most images decoded at once. 0 plans the chunk from free memory.",
        minimum=0, maximum=64, axis=True),
    Arg("nan_check", "Check for NaN/Inf", "bool", True,
        "Check every pixel of every decoded image for NaN or Inf and re-decode only the failed images "
        "in a more robust precision. Off with --disable-nan-check.",
        infotext="VAE Batch NaN check"),
    Arg("ladder", "Recovery precisions", "choice", "webui settings",
        "Precisions tried, in order, for images that came out NaN/Inf. 'webui settings' follows "
        "Settings > VAE: bf16 if 'Automatically convert VAE to bfloat16' is on, then fp32 if "
        "'Automatically revert VAE to 32-bit floats' is on.",
        choices=tuple(LADDERS), infotext="VAE Batch ladder", axis=True),
    Arg("keep_dtype", "Keep recovered precision", "bool", False,
        "After a recovery, keep the VAE in the recovered precision for later generations (the webui's "
        "own behaviour). Off: the VAE goes back to its precision when this job ends."),
    Arg("offload", "Decoded images go to", "choice", "cpu",
        "Where each decoded image waits for the rest of the batch: 'cpu' frees GPU memory at once; "
        "'device' keeps it on the GPU.",
        choices=("cpu", "device")),
    Arg("tiling", "Tiled decode", "choice", "auto",
        "auto: tiles only when an image does not fit (or runs out of memory even alone); always: "
        "every image in tiles; never: no tiles (an image that does not fit fails).",
        choices=("auto", "always", "never"), infotext="VAE Batch tiling", axis=True),
    Arg("tile_mode", "Tile mode", "choice", "exact",
        "exact: tiled output equals untiled output (where memory is short, values wait in a "
        "temporary file or parts are recomputed: slower, still exact); exact-lean: exact without "
        "the temporary file (recomputation only, nothing written to disk); fast: less memory, "
        "colour statistics estimated (close, not identical); auto: exact where it fits, else fast; "
        "plain: independent tiles, the method of other tiled VAEs (seams, per-tile colours), for "
        "comparison. After out-of-memory errors "
        "the engine steps down to leaner variants, plain tiles last, and the infotext says which ran.",
        choices=("exact", "exact-lean", "fast", "auto", "plain"), infotext="VAE Batch tile mode", axis=True),
    Arg("tile_size", "Tile size (latent px, 0 = auto)", "int", 0,
        "Tile side in latent pixels (image pixels / 8), at least 8. 0 plans it from free memory.",
        minimum=0, maximum=256, step=8, infotext="VAE Batch tile size", axis=True),
    Arg("save_latents", "Save latents", "bool", False,
        "Also write this generation's final latents with their infotext (safetensors, our latents "
        "format) into a 'latents' folder beside the images, to decode again later in the Latent "
        "Batch tab."),
    Arg("backend", "VAE", "choice", "webui",
        "webui: the loaded checkpoint's VAE. remote: the Hybrid Inference endpoint set in Settings > "
        "VAE Batch (e.g. another VAE Batch server's /vaebatch/v1/remote/decode); latents are sent "
        "with the model's scaling, images come back for the same checks and recovery.",
        choices=("webui", "remote"), infotext="VAE Batch backend"),
)  # fmt: skip

BY_NAME: dict[str, Arg] = {a.name: a for a in ARGS}

#: Settings that are not script arguments.
EXTRA_SETTINGS: tuple[Arg, ...] = (
    Arg("img2img_encode", "Also encode img2img init images with VAE Batch", "bool", False,
        "When the script is on in img2img, the init-image encode goes through VAE Batch too "
        "(chunked, NaN-checked, tiled when it does not fit)."),
)  # fmt: skip


def defaults(settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Argument defaults, with the Settings values (``vaebatch_<name>``) where present and valid."""
    out: dict[str, Any] = {}
    for arg in ARGS:
        value = arg.default
        if settings is not None and arg.setting_key in settings:
            try:
                value = arg.coerce(settings[arg.setting_key])
            except ValueError:
                value = arg.default
        out[arg.name] = value
    return out


def from_positional(values: Sequence[Any], base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Script arguments (UI or API order) to a name->value dict; missing trailing values keep
    ``base`` (the defaults); every value is checked."""
    out = dict(base) if base is not None else defaults()
    for arg, value in zip(ARGS, values, strict=False):
        if value is None:
            continue
        out[arg.name] = arg.coerce(value)
    return out


def asked_for(values: Sequence[Any], overrides: Mapping[str, Any] | None = None) -> bool:
    """Whether arguments that could not all be read still asked for VAE Batch: the first one is
    on (or is not a readable true/false), or an X/Y/Z cell turned it on."""
    if overrides and overrides.get("enabled"):
        return True
    if not values or values[0] is None:
        return False
    try:
        return bool(BY_NAME["enabled"].coerce(values[0]))
    except ValueError:
        return True


def ladder_for(choice: str, *, webui_bf16: bool, webui_fp32: bool) -> tuple[str, ...]:
    rungs = LADDERS[choice]
    if rungs is not None:
        return rungs
    return (("bf16",) if webui_bf16 else ()) + (("fp32",) if webui_fp32 else ())


def engine_options(
    values: Mapping[str, Any], *, ladder: tuple[str, ...], nan_check_allowed: bool = True
) -> EngineOptions:
    """The engine options these script values ask for (``ladder`` already resolved)."""
    tile = int(values["tile_size"])
    return EngineOptions(
        max_chunk=int(values["chunk"]) or None,
        nan_check=bool(values["nan_check"]) and nan_check_allowed,
        ladder=ladder,
        keep_recovered_dtype=bool(values["keep_dtype"]),
        offload=str(values["offload"]),
        tiling=values["tiling"],
        tile_mode=values["tile_mode"],
        tile_size=max(8, tile) if tile else None,
    )


def infotext_options(values: Mapping[str, Any]) -> dict[str, str]:
    """The ``VAE Batch …`` infotext entries for options that change the output (non-default ones)."""
    out: dict[str, str] = {}
    for arg in ARGS:
        if arg.infotext and values[arg.name] != arg.default:
            out[arg.infotext] = str(values[arg.name])
    return out


def from_infotext(params: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Script values a pasted infotext implies: on when ``VAE Batch`` is present, options from
    their labels, ``base`` (default: the built-in defaults) for the rest."""
    out = dict(base) if base is not None else {arg.name: arg.default for arg in ARGS}
    out["enabled"] = TITLE in params
    for arg in ARGS:
        if arg.infotext and arg.infotext in params:
            with contextlib.suppress(ValueError):  # a hand-edited value: keep the default
                out[arg.name] = arg.coerce(params[arg.infotext])
    return out


def help_table() -> dict[str, str]:
    """Element-id suffix -> hover help, for javascript/vaebatch.js."""
    return {arg.elem_suffix: arg.help for arg in ARGS}


def api_doc() -> str:
    """Markdown table of the positional alwayson_scripts arguments (README; a test keeps it in sync)."""
    import json

    rows = ["| # | argument | JSON type | default | values |", "|---:|---|---|---|---|"]
    for i, arg in enumerate(ARGS):
        if arg.kind == "choice":
            values = " · ".join(json.dumps(c) for c in arg.choices)
        elif arg.kind == "int":
            values = f"{arg.minimum}..{arg.maximum}"
        else:
            values = "true · false"
        kind = {"bool": "boolean", "int": "integer", "choice": "string"}[arg.kind]
        rows.append(f"| {i} | {arg.label} | {kind} | `{json.dumps(arg.default)}` | {values} |")
    return "\n".join(rows)
