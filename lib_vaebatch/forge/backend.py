"""A Forge VAE (``forge_objects.vae``) behind the engine's VAE interface.

The engine runs the module's raw ``decode`` on the VAE's device in its dtype, as Forge's own chunk
loop does, but with its own chunking (from the memory manager's free memory), NaN/Inf checks,
precision ladder and exact tiles. Loading goes through Forge's memory manager, with a request sized
by the engine's planner; the cache is released through it when a job ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from lib_vaebatch.backends.base import Moments, Op, VAEBackend, module_moments, module_tiling_program
from lib_vaebatch.families import Family, get_family
from lib_vaebatch.forge.adapters import Adapter
from lib_vaebatch.tiling.program import Program


def forge_family(model: Any, vae: Any) -> Family:
    if int(getattr(vae, "latent_channels", 4)) == 16:
        return get_family("sd3" if getattr(model, "is_sd3", False) else "flux")
    if getattr(model, "is_sdxl", False):
        return get_family("sdxl")
    if getattr(model, "is_sd2", False):
        return get_family("sd2")
    return get_family("sd1")


class ForgeVAE(VAEBackend):
    """``model.forge_objects.vae`` (or a VAE built from a file for that model)."""

    def __init__(self, model: Any, adapter: Adapter, vae: Any = None, name: str | None = None) -> None:
        self.model = model
        self.adapter = adapter
        self.vae = vae if vae is not None else adapter.vae_of(model)
        self.module: torch.nn.Module = self.vae.first_stage_model
        self.family = forge_family(model, self.vae)
        self.family_source = f"{adapter.host.label} model"
        self.name = name or f"{adapter.host.label} VAE"
        #: The dtype Forge built the weights in: a recovery "to fp32" computes in fp32 over these.
        self.stored_dtype: torch.dtype = self.vae.vae_dtype
        self._scale, self._shift = adapter.scaling(model, self.vae)
        self._programs: dict[str, Program] = {}

    # -- what the engine reads -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return torch.device(self.vae.device)

    @property
    def dtype(self) -> torch.dtype:
        for p in self.module.parameters():
            return p.dtype
        return self.vae.vae_dtype

    @property
    def latent_channels(self) -> int:
        return int(self.vae.latent_channels)

    @property
    def scaling_factor(self) -> float:
        return self._scale

    @property
    def shift_factor(self) -> float:
        return self._shift

    def set_dtype(self, dtype: torch.dtype) -> None:
        self.module.to(dtype=dtype)

    def keep_dtype(self) -> None:
        """Make the current dtype Forge's own for later decodes ("keep recovered precision")."""
        self.vae.vae_dtype = self.dtype

    def weights_note(self, dtype_name: str) -> str:
        """What a recovery in ``dtype_name`` really ran: Forge built the weights in its dtype."""
        from lib_vaebatch.devices import dtype_name as name_of

        stored = name_of(self.stored_dtype)
        if dtype_name in ("fp32", "bf16") and stored not in ("fp32", dtype_name):
            return f"{dtype_name} compute over the {stored} weights Forge loaded"
        return ""

    # -- memory manager ----------------------------------------------------------------------------
    def reserve(self, op: Op, pixels: int) -> None:
        """Before a job: load the VAE through Forge's memory manager, asking for room for one
        sample as our planner sizes it (Forge's own loop asks for one sample too)."""
        from lib_vaebatch.engine.planner import estimate_bytes

        request = estimate_bytes(self, op, pixels, self.dtype) + self.fixed_bytes(op)
        self.adapter.load(self.vae, request)

    def free_bytes(self) -> int | None:
        return self.adapter.free_bytes(self.vae)

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        try:
            with torch.no_grad():
                yield
        finally:
            self.adapter.empty_cache()

    # -- host scaling and hand-back --------------------------------------------------------------
    def to_raw(self, latents: torch.Tensor) -> torch.Tensor:
        return self.adapter.to_vae_latent(self.model, self.vae, latents)

    def hand_back_reason(self, latents: torch.Tensor) -> str | None:
        return self.adapter.hand_back_reason(self.model, self.vae, latents)

    def forge_tiled_decode(self, raw: torch.Tensor) -> torch.Tensor:
        return self.adapter.forge_tiled_decode(self.vae, raw)

    # -- work ----------------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.module.decode(latents.to(self.device, self.dtype))

    def encode(self, pixels: torch.Tensor) -> Moments:
        # The posterior mean: Forge 2 and Neo's encode() samples, so the moments are read here.
        return module_moments(self.module, pixels.to(self.device, self.dtype))

    def tiling_program(self, op: Op) -> Program:
        if op not in self._programs:
            self._programs[op] = module_tiling_program(self.module, op)
        return self._programs[op]
