"""comfy/ldm/models/autoencoder.py's classes over the ldm replica: ``AutoencoderKL`` (quant convs;
SD1/SD2/SDXL) and ``AutoencodingEngine`` (none; SD3/Flux.1). ``encode`` gives the posterior mode
(``DiagonalGaussianRegularizer(sample=False)``), ``decode`` the decoder's output."""

from __future__ import annotations

from tests.ldm_replica import ReplicaAutoencoderKL


class AutoencoderKL(ReplicaAutoencoderKL):
    def __init__(self, widths, layers, embed_dim):
        super().__init__(tuple(widths), layers, embed_dim)

    def encode(self, x):
        return self.encode_moments(x).chunk(2, dim=1)[0]


class AutoencodingEngine(ReplicaAutoencoderKL):
    def __init__(self, widths, layers, embed_dim):
        super().__init__(tuple(widths), layers, embed_dim, sd3=True)

    def encode(self, x):
        return self.encoder(x).chunk(2, dim=1)[0]
