"""A ComfyUI ``VAE`` backed by a Hybrid Inference endpoint (another VAE Batch server's
``/vaebatch/v1/remote/decode``, or any server speaking diffusers' remote-VAE protocol): what the
*VAE Batch Remote VAE* node outputs. The pack's nodes run the engine over the endpoint (chunks,
NaN/Inf checks, retries with backoff); ComfyUI's own *VAE Decode* and *VAE Encode* work with it
too, through the ``decode``/``encode`` methods they call."""

from __future__ import annotations

from typing import Any

import torch

from lib_vaebatch.backends.remote import RemoteVAE
from lib_vaebatch.engine.decode import decode_latents
from lib_vaebatch.engine.encode import encode_pixels

FAMILY_CHOICES = ("auto", "sd1", "sd2", "sdxl", "sd3", "flux")


class RawRemoteVAE(RemoteVAE):
    """The endpoint in raw latent space, as ComfyUI's LATENTs are (the family still names the
    latents' layout; the protocol sends raw latents either way)."""

    @property
    def scaling_factor(self) -> float:
        return 1.0

    @property
    def shift_factor(self) -> float:
        return 0.0


class RemoteComfyVAE:
    """Stands where ComfyUI's ``comfy.sd.VAE`` goes, for image VAEs (latents raw, pixels NHWC in
    [0, 1], as ComfyUI's VAE takes and gives them)."""

    latent_dim = 2
    output_channels = 3
    downscale_ratio = upscale_ratio = 8
    first_stage_model = None  # no module here: the work is on the endpoint

    def __init__(self, endpoint: str, family: str = "auto") -> None:
        self.vaebatch_backend = RawRemoteVAE(endpoint, family=None if family == "auto" else family)
        self.latent_channels = self.vaebatch_backend.latent_channels
        self.device = torch.device("cpu")

    def spacial_compression_decode(self) -> int:
        return 8

    def spacial_compression_encode(self) -> int:
        return 8

    def decode(self, samples: torch.Tensor, vae_options: Any = None) -> torch.Tensor:
        result = decode_latents(self.vaebatch_backend, samples, scaled=False)
        if not result.ok:
            raise RuntimeError(f"remote VAE decode: {'; '.join(r.message for r in result.failed)}")
        images = torch.stack([o.float() for o in result.outputs])  # type: ignore[union-attr]
        return torch.clamp((images + 1.0) / 2.0, min=0.0, max=1.0).movedim(1, -1)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        from lib_vaebatch.comfy.glue import crop_to_ratio

        x = crop_to_ratio(pixels[..., :3]).movedim(-1, 1).float() * 2.0 - 1.0
        result = encode_pixels(self.vaebatch_backend, x)
        if not result.ok:
            raise RuntimeError(f"remote VAE encode: {'; '.join(r.message for r in result.failed)}")
        return torch.stack([o.float() for o in result.outputs])  # type: ignore[union-attr]


def check_endpoint(endpoint: str) -> str | bool:
    """``validate_inputs``' answer for an endpoint: True, or why it cannot be one."""
    import urllib.parse

    parts = urllib.parse.urlsplit(str(endpoint).strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return f"endpoint: expected an http(s) URL, not {endpoint!r}"
    return True
