"""The built-in approximate VAE: a per-family linear map between latents and RGB.

Preview quality only: one 3-vector per latent pixel, upsampled. Needs no weights, so it is the default
when no VAE is given. Encoding is the least-squares inverse (pseudo-inverse) of the same map applied
to an 8x8 area average, so ``decode(encode(x))`` is the area-averaged image, upsampled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lib_vaebatch.backends.base import Moments, Op, VAEBackend
from lib_vaebatch.devices import resolve_device
from lib_vaebatch.families import Family, get_family, to_raw, to_scaled


class ApproxVAE(VAEBackend):
    """Linear latent<->RGB approximation for ``family``."""

    preview = True

    def __init__(
        self,
        family: Family | str = "sd1",
        device: torch.device | str | None = "cpu",
        dtype: torch.dtype = torch.float32,
        family_source: str = "given",
    ) -> None:
        self.family = get_family(family) if isinstance(family, str) else family
        self.family_source = family_source
        self.name = f"approx-{self.family.name}"
        self._device = resolve_device(device)
        self._dtype = dtype
        factors = torch.tensor(self.family.rgb_factors, dtype=torch.float64)  # [C, 3]
        self._factors = factors.to(torch.float32)
        self._inverse = torch.linalg.pinv(factors).to(torch.float32)  # [3, C]
        self._bias = torch.tensor(self.family.rgb_bias, dtype=torch.float32)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def set_dtype(self, dtype: torch.dtype) -> None:
        self._dtype = dtype

    def bytes_per_pixel(self, op: Op) -> float:
        return 16.0

    def fixed_bytes(self, op: Op) -> int:
        return 0

    def attention_tokens(self, op: Op, pixels: int) -> int:
        return 0

    def max_efficient_chunk(self, op: Op) -> int | None:
        return None  # a few vector ops: batching only helps

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = to_scaled(
            latents.to(self._device, self._dtype), self.family.scaling_factor, self.family.shift_factor
        )
        factors = self._factors.to(self._device, self._dtype)
        bias = self._bias.to(self._device, self._dtype)
        rgb = torch.einsum("bchw,cr->brhw", z, factors) + bias[None, :, None, None]
        return F.interpolate(rgb, scale_factor=self.downscale, mode="bilinear", align_corners=False)

    def encode(self, pixels: torch.Tensor) -> Moments:
        x = pixels.to(self._device, self._dtype)
        small = F.avg_pool2d(x, self.downscale)
        inverse = self._inverse.to(self._device, self._dtype)
        bias = self._bias.to(self._device, self._dtype)
        z = torch.einsum("brhw,rc->bchw", small - bias[None, :, None, None], inverse)
        return Moments(to_raw(z, self.family.scaling_factor, self.family.shift_factor))
