"""Models for the fake webui: an ldm-layout VAE (our replica) wrapped the way ldm's LatentDiffusion
presents it (reference §1.8), and a Forge-shaped model whose first_stage_model is None (§8)."""

from __future__ import annotations

import types

import torch

from tests.ldm_replica import ReplicaAutoencoderKL, replica_from
from tests.support import tiny_autoencoder


class Posterior:
    """ldm's DiagonalGaussianDistribution, as far as the webui uses it."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self) -> torch.Tensor:
        return self.mean + self.std * torch.randn_like(self.mean)

    def mode(self) -> torch.Tensor:
        return self.mean


class LdmAutoencoderKL(ReplicaAutoencoderKL):
    """ldm.models.autoencoder.AutoencoderKL: encode -> posterior, decode(z) on raw latents, and a
    Lightning-style ``dtype`` that follows ``.to()``."""

    decode_calls: list[int]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def encode(self, x: torch.Tensor) -> Posterior:
        return Posterior(self.encode_moments(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self.decode_calls.append(z.shape[0])
        return super().decode(z)


def ldm_vae(seed: int = 0, *, overflow: str | None = None) -> LdmAutoencoderKL:
    """The ldm-layout tiny VAE; ``overflow="fp16"`` or ``"bf16"`` makes its decodes non-finite in that
    precision, for real, while fp32 stays finite."""
    replica = replica_from(tiny_autoencoder(4, seed=seed))
    vae = LdmAutoencoderKL((32, 64, 64, 64), 1, 4)
    vae.load_state_dict(replica.state_dict())
    vae.decode_calls = []
    with torch.no_grad():
        if overflow == "fp16":  # activations overflow fp16's 65504 (NaN), bf16/fp32 stay finite
            vae.decoder.conv_in.weight.mul_(1e5)
            vae.decoder.conv_in.bias.mul_(1e5)
        elif overflow == "bf16":
            # bf16 has fp32's exponent range, so activations that overflow it overflow fp32 too; what
            # it cannot hold is a result between its largest finite value (3.3895e38) and fp32's
            # (3.4028e38): it rounds to Inf. The last conv's red channel gets one: bf16's largest
            # finite bias plus 1e35 times a constant 10 (a norm_out channel with weight 0, bias 10).
            top = torch.finfo(torch.bfloat16).max
            vae.decoder.norm_out.weight[0], vae.decoder.norm_out.bias[0] = 0.0, 10.0
            vae.decoder.conv_out.weight[:, 0] = 0.0
            vae.decoder.conv_out.weight[0, 0, 1, 1] = 1e35
            vae.decoder.conv_out.bias[0] = top  # 3.3895e38 + ~1e36: finite in fp32, Inf in bf16
        elif overflow is not None:
            raise ValueError(f"overflow is fp16 or bf16, not {overflow!r}")
    return vae.eval().requires_grad_(False)


class LatentDiffusion:
    """SD1 (ldm) or SDXL (sgm) as the webui holds them: scale_factor, decode_first_stage etc."""

    def __init__(self, vae: LdmAutoencoderKL, *, sdxl: bool = False) -> None:
        self.first_stage_model = vae
        self.scale_factor = 0.13025 if sdxl else 0.18215
        self.is_sdxl, self.is_sd1, self.is_sd2, self.is_sd3, self.is_ssd = sdxl, not sdxl, False, False, False
        self.latent_channels = 4
        self.lowvram = False

    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        return self.first_stage_model.decode(1.0 / self.scale_factor * z)

    def encode_first_stage(self, x: torch.Tensor) -> Posterior:
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, posterior: Posterior) -> torch.Tensor:
        return posterior.sample() * self.scale_factor


class ForgeModel:
    """Forge: first_stage_model is None; the VAE lives in forge_objects.vae (§8)."""

    def __init__(self, vae: LdmAutoencoderKL) -> None:
        self.first_stage_model = None
        self.forge_objects = types.SimpleNamespace(
            vae=types.SimpleNamespace(first_stage_model=vae, latent_channels=4)
        )
        self.latent_channels = 4
        self.lowvram = False
        self.scale_factor = 0.18215

    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        vae = self.forge_objects.vae.first_stage_model
        return vae.decode(1.0 / self.scale_factor * z)
