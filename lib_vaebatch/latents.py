"""Latents files: ours (``vaebatch/1``), ComfyUI ``.latent``, NumPy ``.npy`` and PyTorch ``.pt``/``.pth``.

Ours is a safetensors file with one tensor ``latents`` ``[B, C, h, w]`` (float32 or float16) and flat
string metadata, every key optional::

    format          "vaebatch/1"
    family          sd1 | sd2 | sdxl | sd3 | flux  (default: from the VAE; else 4 ch -> sd1, 16 -> flux)
    scaled          "true" (in the sampler's space, as the webui's samples) | "false" (raw VAE space)
    scaling_factor  float, default the family's
    shift_factor    float, default the family's
    sources         JSON list of source names, one per sample
    sizes           JSON list of [width, height] of the source images before crop/resize
    vae_name        name of the VAE that encoded them
    vae_hash        its short hash (10 hex digits, as the webui shows)
    parameters      JSON list of infotext strings, one per sample

A file holding only the tensor works. Reading never executes code: safetensors, ``.npy`` with
``allow_pickle=False``, and ``.pt``/``.pth`` (``torch.save`` of a tensor or of a dict with ``latents``,
``samples`` or ``latent_tensor``) through :mod:`lib_vaebatch.ptfile`, which interprets a whitelisted
subset of pickle opcodes itself and never unpickles. ``.ckpt``, ``.bin`` and ``.pkl`` are refused.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from tokenize import TokenError
from typing import Any

import numpy as np
import torch

from lib_vaebatch.families import (
    FAMILY_NAMES,
    Family,
    default_family_for_channels,
    get_family,
    no_family_problem,
)
from lib_vaebatch.naming import publish
from lib_vaebatch.ptfile import PtFileError, load_pt_tensor
from lib_vaebatch.tensorfile import TensorFileError, open_safetensors, read_header

FORMAT = "vaebatch/1"
TENSOR = "latents"
COMFY_TENSOR = "latent_tensor"
COMFY_MARKER = "latent_format_version_0"
COMFY_LEGACY_SCALE = 0.18215
MAX_LATENT_ELEMENTS = 1 << 31  # 8 GiB of float32: refused before reading anything
SUFFIXES = (".safetensors", ".latent", ".npy", ".pt", ".pth")
PT_KEYS = (TENSOR, "samples", COMFY_TENSOR)  # the tensor taken from a dict saved in a .pt file


class LatentFileError(ValueError):
    """A latents file that cannot be used. ``str()`` is one line naming the file, the sample
    index where one applies, and the problem."""

    def __init__(self, path: str | Path, problem: str, index: int | None = None) -> None:
        where = f"{path}" + (f": sample {index}" if index is not None else "")
        super().__init__(f"{where}: {problem}")
        self.path = str(path)
        self.problem = problem
        self.index = index


@dataclass
class LatentBatch:
    """Latents with what is known about them."""

    latents: torch.Tensor  # [B, C, h, w], float32 on CPU
    scaled: bool = True
    family: str | None = None  # as declared by the file
    scaling_factor: float | None = None
    shift_factor: float | None = None
    sources: list[str] | None = None
    sizes: list[tuple[int, int]] | None = None
    vae_name: str | None = None
    vae_hash: str | None = None
    parameters: list[str] | None = None
    path: str | None = None
    kind: str = "vaebatch"  # vaebatch | comfyui | npy
    extra: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    @property
    def channels(self) -> int:
        return int(self.latents.shape[1])

    def resolve_family(self, fallback: Family | None = None) -> Family:
        """The declared family, else ``fallback`` (the VAE's) if its channels fit, else by channels
        (``ValueError`` for a channel count no family has)."""
        if self.family:
            return get_family(self.family)
        if fallback is not None and fallback.latent_channels == self.channels:
            return fallback
        try:
            return default_family_for_channels(self.channels)
        except ValueError:
            raise ValueError(no_family_problem(self.channels)) from None

    def scaling(self, family: Family) -> tuple[float, float]:
        """(scaling, shift) to un-scale with: the file's own values, else the family's."""
        scale = self.scaling_factor if self.scaling_factor is not None else family.scaling_factor
        shift = self.shift_factor if self.shift_factor is not None else family.shift_factor
        return float(scale), float(shift)

    def metadata(self) -> dict[str, str]:
        meta: dict[str, str] = {"format": FORMAT, "scaled": "true" if self.scaled else "false"}
        if self.family:
            meta["family"] = self.family
        if self.scaling_factor is not None:
            meta["scaling_factor"] = repr(float(self.scaling_factor))
        if self.shift_factor is not None:
            meta["shift_factor"] = repr(float(self.shift_factor))
        if self.sources is not None:
            meta["sources"] = json.dumps(list(self.sources))
        if self.sizes is not None:
            meta["sizes"] = json.dumps([list(s) for s in self.sizes])
        if self.vae_name:
            meta["vae_name"] = self.vae_name
        if self.vae_hash:
            meta["vae_hash"] = self.vae_hash
        if self.parameters is not None:
            meta["parameters"] = json.dumps(list(self.parameters))
        meta.update({k: v for k, v in self.extra.items() if k not in meta})
        return meta


def _check_tensor(path: str | Path, t: torch.Tensor) -> torch.Tensor:
    if t.ndim == 5:
        raise LatentFileError(path, f"5-D (video) latents {list(t.shape)} are not supported")
    if t.ndim != 4:
        raise LatentFileError(
            path, f"latents must be [batch, channels, height, width], got shape {list(t.shape)}"
        )
    if not t.is_floating_point():
        raise LatentFileError(path, f"latents must be floating point, got {t.dtype}")
    if t.shape[0] == 0:
        raise LatentFileError(path, "the file holds no samples")
    if t.shape[2] == 0 or t.shape[3] == 0:
        raise LatentFileError(path, f"latents have an empty spatial size {t.shape[2]}x{t.shape[3]}")
    return t.to(torch.float32).contiguous()


def _json_list(path: str | Path, meta: dict[str, str], key: str, n: int) -> list[Any] | None:
    if key not in meta:
        return None
    try:
        value = json.loads(meta[key])
    except json.JSONDecodeError:
        raise LatentFileError(path, f"metadata {key!r} is not valid JSON") from None
    if not isinstance(value, list):
        raise LatentFileError(path, f"metadata {key!r} must be a JSON list")
    if len(value) != n:
        raise LatentFileError(path, f"metadata {key!r} has {len(value)} entries for {n} samples")
    return value


def _float(path: str | Path, meta: dict[str, str], key: str) -> float | None:
    if key not in meta or meta[key] in ("", "none", "None"):
        return None
    try:
        value = float(meta[key])
    except ValueError:
        raise LatentFileError(path, f"metadata {key!r} is not a number: {meta[key]!r}") from None
    if not np.isfinite(value) or (key == "scaling_factor" and value == 0):
        raise LatentFileError(path, f"metadata {key!r} is not usable: {meta[key]!r}")
    return value


_KNOWN_KEYS = (
    "format", "family", "scaled", "scaling_factor", "shift_factor", "sources", "sizes", "vae_name",
    "vae_hash", "parameters",
)  # fmt: skip


def _from_metadata(path: str | Path, t: torch.Tensor, meta: dict[str, str]) -> LatentBatch:
    n = int(t.shape[0])
    family = meta.get("family") or None
    if family is not None:
        if family.lower() not in FAMILY_NAMES:
            raise LatentFileError(path, f"unknown family {family!r} (known: {', '.join(FAMILY_NAMES)})")
        family = family.lower()
        expected = get_family(family).latent_channels
        if expected != t.shape[1]:
            raise LatentFileError(path, f"family {family} has {expected} channels, latents have {t.shape[1]}")
    scaled_text = meta.get("scaled", "true").strip().lower()
    if scaled_text not in ("true", "false", "1", "0", "yes", "no"):
        raise LatentFileError(path, f"metadata 'scaled' must be true or false, not {meta['scaled']!r}")
    sources = _json_list(path, meta, "sources", n)
    sizes = _json_list(path, meta, "sizes", n)
    params = _json_list(path, meta, "parameters", n)
    if sources is not None and not all(isinstance(s, str) for s in sources):
        raise LatentFileError(path, "metadata 'sources' must be a list of strings")
    if params is not None and not all(isinstance(s, str) for s in params):
        raise LatentFileError(path, "metadata 'parameters' must be a list of strings")
    if sizes is not None:
        ok = all(
            isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) and v > 0 for v in s)
            for s in sizes
        )
        if not ok:
            raise LatentFileError(path, "metadata 'sizes' must be a list of [width, height] pairs")
    known = set(_KNOWN_KEYS)
    return LatentBatch(
        latents=t,
        scaled=scaled_text in ("true", "1", "yes"),
        family=family,
        scaling_factor=_float(path, meta, "scaling_factor"),
        shift_factor=_float(path, meta, "shift_factor"),
        sources=sources,
        sizes=[(int(a), int(b)) for a, b in sizes] if sizes is not None else None,
        vae_name=meta.get("vae_name") or None,
        vae_hash=meta.get("vae_hash") or None,
        parameters=params,
        path=str(path),
        extra={k: v for k, v in meta.items() if k not in known},
    )


def _read_safetensors(path: Path) -> LatentBatch:
    try:
        infos, meta = read_header(path)
    except TensorFileError as exc:
        raise LatentFileError(path, str(exc).removeprefix(f"{path}: ")) from None
    name = TENSOR if TENSOR in infos else COMFY_TENSOR if COMFY_TENSOR in infos else None
    if name is None:
        if len(infos) == 1:
            name = next(iter(infos))
        else:
            found = ", ".join(sorted(infos)[:5]) or "none"
            raise LatentFileError(path, f"no '{TENSOR}' tensor (found: {found})")
    info = infos[name]
    elements = math.prod(info.shape)  # exact: numpy's int64 would overflow on absurd shapes
    if elements > MAX_LATENT_ELEMENTS:
        raise LatentFileError(path, f"tensor {name!r} declares {list(info.shape)}: too large to be latents")
    if info.dtype not in ("F32", "F16", "BF16", "F64"):
        raise LatentFileError(path, f"latents must be floating point, got {info.dtype}")
    try:
        with open_safetensors(path) as f:
            tensor = f.get_tensor(name)
    except TensorFileError as exc:
        raise LatentFileError(path, str(exc).removeprefix(f"{path}: ")) from None
    tensor = _check_tensor(path, tensor)
    if name == COMFY_TENSOR:
        return _comfy(path, tensor, infos, meta)
    return _from_metadata(path, tensor, meta)


def _comfy(path: Path, t: torch.Tensor, infos: dict[str, Any], meta: dict[str, str]) -> LatentBatch:
    """ComfyUI stores raw VAE-space latents; files without the version marker are legacy files
    stored multiplied by 0.18215."""
    extra = {k: v for k, v in meta.items() if k in ("prompt", "workflow")}
    if COMFY_MARKER in infos:
        return LatentBatch(t, scaled=False, path=str(path), kind="comfyui", extra=extra)
    return LatentBatch(
        t,
        scaled=True,
        scaling_factor=COMFY_LEGACY_SCALE,
        shift_factor=0.0,
        path=str(path),
        kind="comfyui",
        extra=extra,
    )


def _read_npy(path: Path) -> LatentBatch:
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _fortran, dtype = np.lib.format.read_array_header_2_0(f)
        if dtype.hasobject:
            raise LatentFileError(path, "object arrays (pickle) are never loaded")
        if math.prod(shape) > MAX_LATENT_ELEMENTS:
            raise LatentFileError(path, f"array declares {list(shape)}: too large to be latents")
        arr = np.load(path, allow_pickle=False)
    except LatentFileError:
        raise
    # numpy parses the header as Python literals: a damaged one raises tokenizer and syntax
    # errors too, and absurd dimensions overflow.
    except (OSError, ValueError, EOFError, SyntaxError, TokenError, TypeError, OverflowError,
            RecursionError, MemoryError) as exc:  # fmt: skip
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise LatentFileError(path, f"not a readable .npy file ({why})") from None
    if arr.ndim == 3:
        arr = arr[None]
    if not np.issubdtype(arr.dtype, np.floating):
        raise LatentFileError(path, f"latents must be floating point, got {arr.dtype}")
    t = _check_tensor(path, torch.from_numpy(np.array(arr, dtype=np.float32)))
    return LatentBatch(t, scaled=True, path=str(path), kind="npy")


def read_latents(path: str | Path) -> LatentBatch:
    """Read our latents file, a ComfyUI ``.latent``, or a ``.npy``/``.pt``/``.pth`` (assumed scaled).

    Raises :class:`LatentFileError` for anything unusable (never a traceback-worthy error)."""
    p = Path(path)
    if not p.is_file():
        raise LatentFileError(p, "no such file")
    suffix = p.suffix.lower()
    if suffix == ".npy":
        return _read_npy(p)
    if suffix in (".safetensors", ".latent"):
        return _read_safetensors(p)
    if suffix in (".pt", ".pth"):
        try:
            t = load_pt_tensor(p, PT_KEYS, max_elements=MAX_LATENT_ELEMENTS)
        except PtFileError as exc:
            raise LatentFileError(p, exc.problem) from None
        t = _check_tensor(p, t[None] if t.ndim == 3 else t)
        return LatentBatch(t, scaled=True, path=str(p), kind="pt")
    if suffix in (".ckpt", ".bin", ".pkl"):
        raise LatentFileError(p, "pickle-based files are never loaded (they can run code); use .safetensors")
    raise LatentFileError(p, f"unknown latents file type {suffix or '(none)'} (use {', '.join(SUFFIXES)})")


def write_latents(
    path: str | Path, batch: LatentBatch, *, half: bool = False, overwrite: bool = False
) -> Path:
    """Write ``batch`` as our safetensors format (float16 with ``half``). Refuses to overwrite."""
    from safetensors.torch import save_file

    p = Path(path)
    if p.exists() and not overwrite:
        raise FileExistsError(f"{p} exists (not overwritten)")
    tensor = batch.latents.detach().to("cpu", torch.float16 if half else torch.float32).contiguous()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    save_file({TENSOR: tensor}, str(tmp), metadata=batch.metadata())
    publish(tmp, p, overwrite=overwrite)
    return p


def write_comfy_latent(path: str | Path, latents_raw: torch.Tensor, *, overwrite: bool = False) -> Path:
    """Write a ComfyUI ``.latent`` (raw VAE-space latents plus the version marker)."""
    from safetensors.torch import save_file

    p = Path(path)
    if p.exists() and not overwrite:
        raise FileExistsError(f"{p} exists (not overwritten)")
    p.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        COMFY_TENSOR: latents_raw.detach().to("cpu", torch.float32).contiguous(),
        COMFY_MARKER: torch.tensor([]),
    }
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp))
    publish(tmp, p, overwrite=overwrite)
    return p
