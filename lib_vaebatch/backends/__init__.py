"""VAE backends and :func:`load_vae`, the one way the CLI and apps pick a VAE."""

from __future__ import annotations

from pathlib import Path

import torch

from lib_vaebatch.backends.approx import ApproxVAE
from lib_vaebatch.backends.base import Moments, TilingUnavailableError, VAEBackend

__all__ = ["ApproxVAE", "Moments", "TilingUnavailableError", "VAEBackend", "load_vae"]

APPROX = "approx"
REMOTE = "remote:"


def load_vae(
    spec: str | Path | None = None,
    *,
    family: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> VAEBackend:
    """``None``/``"approx"``: the built-in approximate VAE (preview quality); ``remote:URL`` or an
    ``http(s)://`` URL: a Hybrid Inference endpoint (:class:`~lib_vaebatch.backends.remote.RemoteVAE`,
    ``dtype`` is the latents' transfer dtype); else a path to a ``.safetensors`` VAE or a diffusers
    folder (needs the ``diffusers`` package)."""
    if spec is None or str(spec).strip().lower() == APPROX:
        return ApproxVAE(
            family or "sd1", device=device or "cpu", family_source="given" if family else "default"
        )
    text = str(spec).strip()
    if text.lower().startswith((REMOTE, "http://", "https://")):
        from lib_vaebatch.backends.remote import RemoteVAE

        url = text[len(REMOTE) :] if text.lower().startswith(REMOTE) else text
        return RemoteVAE(url, family=family, dtype=dtype or torch.float32)
    from lib_vaebatch.backends.diffusers_vae import load_diffusers_vae

    return load_diffusers_vae(spec, family=family, device=device, dtype=dtype)
