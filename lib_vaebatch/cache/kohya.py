"""The latents cache kohya-ss/sd-scripts reads with ``--cache_latents_to_disk`` (sd3 branch merged to
main, 2026-02; ``library/strategy_sd.py`` and ``strategy_base.py``): one ``.npz`` next to each image,
``<stem>_<WWWW>x<HHHH>_sd.npz`` (SD 1/2) or ``_sdxl.npz`` (SDXL), the size being the image file's
own (before any EXIF orientation, as sd-scripts reads it). Arrays, without a resolution suffix for
SD/SDXL: ``latents`` [C, h, w] float32 (the VAE's raw latents, unscaled), ``original_size`` [W, H],
``crop_ltrb`` [4], and with the options ``latents_flipped`` and ``alpha_mask`` [H, W] float32.

We add ``vaebatch_cache`` (a unicode scalar: the cache's fingerprint), which sd-scripts ignores,
so a rerun can tell our files from others. Files are read back only with ``allow_pickle=False``."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from lib_vaebatch.cache.settings import CacheSettings

MARKER = "vaebatch_cache"
SUFFIXES = {"sd1": "_sd.npz", "sd2": "_sd.npz", "sdxl": "_sdxl.npz"}


def check_family(family: str) -> None:
    if family not in SUFFIXES:
        raise ValueError(
            f"--format kohya writes sd-scripts' SD/SDXL latents cache; a {family} VAE is not one of "
            f"{', '.join(sorted(SUFFIXES))}"
        )


def npz_path(image: Path, size: tuple[int, int], family: str) -> Path:
    check_family(family)
    return image.with_name(f"{image.stem}_{size[0]:04d}x{size[1]:04d}{SUFFIXES[family]}")


def old_npz_path(image: Path) -> Path:
    """sd-scripts reads ``<stem>.npz`` instead of ours when that exists."""
    return image.with_suffix(".npz")


def arrays(
    latents: np.ndarray,
    original_size: list[int],
    crop: list[float],
    flipped: np.ndarray | None,
    mask: np.ndarray | None,
    fingerprint: str,
) -> dict[str, np.ndarray]:
    out = {
        "latents": np.ascontiguousarray(latents, dtype=np.float32),
        "original_size": np.array(original_size),
        "crop_ltrb": np.array(crop),
    }
    if flipped is not None:
        out["latents_flipped"] = np.ascontiguousarray(flipped, dtype=np.float32)
    if mask is not None:
        out["alpha_mask"] = np.ascontiguousarray(mask, dtype=np.float32)
    out[MARKER] = np.array(fingerprint)
    return out


def save(path: Path, values: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a name
        np.savez(f, **values)


def read(path: Path) -> dict[str, Any]:
    """All arrays of an npz, never unpickling (``allow_pickle=False``)."""
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def marker(path: Path) -> str | None:
    """The fingerprint of the cache that wrote ``path`` (None: not ours, or unreadable)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return str(npz[MARKER]) if MARKER in npz.files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None


def valid(path: Path, settings: CacheSettings, shape: tuple[int, int, int], fingerprint: str) -> bool:
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            need = {"latents", "original_size", "crop_ltrb", MARKER}
            if settings.flip:
                need.add("latents_flipped")
            if settings.alpha == "mask":
                need.add("alpha_mask")
            if not need <= keys or str(npz[MARKER]) != fingerprint:
                return False
            lat = npz["latents"]
            return lat.shape == shape and lat.dtype == np.float32
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return False
