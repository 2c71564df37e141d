"""VAE backends and :func:`load_vae`, the one way the CLI and apps pick a VAE."""

from __future__ import annotations

from pathlib import Path

import torch

from lib_vaebatch.backends.approx import ApproxVAE
from lib_vaebatch.backends.base import Moments, TilingUnavailableError, VAEBackend

__all__ = ["ApproxVAE", "Moments", "TilingUnavailableError", "VAEBackend", "load_vae"]

APPROX = "approx"


def load_vae(
    spec: str | Path | None = None,
    *,
    family: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> VAEBackend:
    """``None``/``"approx"``: the built-in approximate VAE (preview quality); else a path to a
    ``.safetensors`` VAE or a diffusers folder (needs the ``diffusers`` package)."""
    if spec is None or str(spec).strip().lower() == APPROX:
        return ApproxVAE(
            family or "sd1", device=device or "cpu", family_source="given" if family else "default"
        )
    from lib_vaebatch.backends.diffusers_vae import load_diffusers_vae

    return load_diffusers_vae(spec, family=family, device=device, dtype=dtype)
