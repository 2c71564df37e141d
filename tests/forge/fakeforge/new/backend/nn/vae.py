"""backend/nn/vae.py (reference §1.1 item 7, §2): IntegratedAutoencoderKL, an ldm-layout module
with the diffusers config's scaling on it (process_in / process_out); encode() samples."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from tests.ldm_replica import ReplicaAutoencoderKL


class IntegratedAutoencoderKL(ReplicaAutoencoderKL):
    def __init__(self, widths=(32, 64, 64, 64), layers=1, latent_channels=4, scaling_factor=0.18215,
                 shift_factor=0.0, use_quant_conv=True):  # fmt: skip
        super().__init__(tuple(widths), layers, latent_channels, sd3=not use_quant_conv)
        self.quant_conv = getattr(self, "quant_conv", None)
        self.post_quant_conv = getattr(self, "post_quant_conv", None)
        self.config = SimpleNamespace(
            down_block_types=("DownEncoderBlock2D",) * len(widths), latent_channels=latent_channels
        )
        self.scaling_factor, self.shift_factor = scaling_factor, float(shift_factor)

    def encode(self, x, regulation=None):
        moments = self.encode_moments(x)
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        return mean + std * torch.randn(mean.shape).to(mean)

    def decode(self, z):
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def process_in(self, latent):
        return (latent - self.shift_factor) * self.scaling_factor

    def process_out(self, latent):
        return (latent / self.scaling_factor) + self.shift_factor
