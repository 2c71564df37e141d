"""ldm_patched/ldm/models/autoencoder.py: AutoencoderKL (ldm layout; encode returns the posterior
mode, as reForge's does)."""

from __future__ import annotations

from tests.ldm_replica import ReplicaAutoencoderKL


class AutoencoderKL(ReplicaAutoencoderKL):
    def __init__(self, widths=(32, 64, 64, 64), layers=1, embed_dim=4):
        super().__init__(tuple(widths), layers, embed_dim)

    def encode(self, x):
        return self.encode_moments(x).chunk(2, dim=1)[0]

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))
