"""The webui's own VAE (``sd_model.first_stage_model``) as an engine backend.

Follows what the model's ``decode_first_stage`` does: the latents are un-scaled by the engine with
the model's constants (SD1/SD2/SDXL: ``1 / scale_factor``; SD3: ``latent_format``'s scale and
shift), then ``first_stage_model.decode`` runs on raw latents, with autocast off, so lowvram/medvram's
wrapper moves the VAE to the GPU first. The model is the one current when the backend is made (the
refiner or hires checkpoint after a swap).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from lib_vaebatch.backends.base import Moments, Op, VAEBackend, module_moments, module_tiling_program
from lib_vaebatch.families import Family, get_family
from lib_vaebatch.tiling.program import Program


class NoWebuiVAEError(RuntimeError):
    """The current model has no ``first_stage_model`` (Forge)."""


def model_family(sd_model: Any) -> Family:
    if getattr(sd_model, "is_sd3", False):
        return get_family("sd3")
    if getattr(sd_model, "is_sdxl", False) or getattr(sd_model, "is_ssd", False):
        return get_family("sdxl")
    if getattr(sd_model, "is_sd2", False):
        return get_family("sd2")
    return get_family("sd1")


def model_scaling(sd_model: Any, family: Family) -> tuple[float, float]:
    """(scale, shift) the way the model's decode_first_stage applies them."""
    fmt = getattr(sd_model, "latent_format", None)
    if fmt is not None and hasattr(fmt, "scale_factor"):  # SD3: process_out = x / scale + shift
        return float(fmt.scale_factor), float(getattr(fmt, "shift_factor", 0.0) or 0.0)
    scale = getattr(sd_model, "scale_factor", None)
    if scale is not None:
        return float(scale.item() if isinstance(scale, torch.Tensor) else scale), 0.0
    return family.scaling_factor, family.shift_factor


class WebuiVAE(VAEBackend):
    """``sd_model.first_stage_model`` behind the engine's VAE interface."""

    def __init__(self, sd_model: Any, module: torch.nn.Module | None = None, name: str | None = None) -> None:
        """``module``: a VAE of the same architecture that is not the model's own (a file chosen in
        the Latent Batch tab, loaded into a copy); it is moved to the device by us, not lowvram."""
        from modules import devices

        fsm = getattr(sd_model, "first_stage_model", None)
        if fsm is None:
            raise NoWebuiVAEError(
                "this model has no first_stage_model (Forge keeps its VAE in forge_objects.vae)"
            )
        self.sd_model = sd_model
        self.detached = module is not None
        self.module: torch.nn.Module = module if module is not None else fsm
        self.family = model_family(sd_model)
        self.family_source = "webui model"
        self.name = name or "webui VAE"
        self._scale, self._shift = model_scaling(sd_model, self.family)
        self._device = torch.device(devices.device)
        self._programs: dict[str, Program] = {}

    # -- what the engine reads -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        for p in self.module.parameters():
            return p.dtype
        return torch.float32

    @property
    def latent_channels(self) -> int:
        return int(getattr(self.sd_model, "latent_channels", self.family.latent_channels))

    @property
    def scaling_factor(self) -> float:
        return self._scale

    @property
    def shift_factor(self) -> float:
        return self._shift

    @property
    def lowvram(self) -> bool:
        return not self.detached and bool(getattr(self.sd_model, "lowvram", False))

    def set_dtype(self, dtype: torch.dtype) -> None:
        self.module.to(dtype=dtype)

    # -- work ------------------------------------------------------------------------------------
    def _without_autocast(self) -> contextlib.AbstractContextManager[Any]:
        from modules import devices

        return devices.without_autocast()

    def ensure_on_device(self) -> None:
        """Before touching submodules directly (encode, tiles): under lowvram/medvram, move the VAE
        the way lowvram's own wrapper does, keeping its bookkeeping (module_in_gpu) in step."""
        if self.detached:
            p = next(self.module.parameters(), None)
            if p is not None and p.device != self._device:
                self.module.to(self._device)
            return
        if not self.lowvram:
            return
        from modules import lowvram

        if lowvram.module_in_gpu is not self.module:
            lowvram.send_everything_to_cpu()
            self.module.to(self._device)
            lowvram.module_in_gpu = self.module

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.detached:
            self.ensure_on_device()
        z = latents.to(self._device, self.dtype)
        with self._without_autocast():
            return self.module.decode(z)  # lowvram's wrapper (an instance attribute) runs here

    def encode(self, pixels: torch.Tensor) -> Moments:
        # The posterior mean needs the moments, which ldm, sgm and SD3 expose differently; the
        # encoder and quant_conv are the same modules in all three.
        self.ensure_on_device()
        x = pixels.to(self._device, self.dtype)
        with self._without_autocast():
            return module_moments(self.module, x)

    def tiling_program(self, op: Op) -> Program:
        if op not in self._programs:
            self._programs[op] = module_tiling_program(self.module, op)
        return self._programs[op]

    def decode_tiled(self, latents: torch.Tensor, settings: Any) -> torch.Tensor:
        self.ensure_on_device()
        with self._without_autocast():
            return super().decode_tiled(latents, settings)

    def encode_tiled(self, pixels: torch.Tensor, settings: Any) -> Moments:
        self.ensure_on_device()
        with self._without_autocast():
            return super().encode_tiled(pixels, settings)

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        with torch.no_grad(), self._without_autocast():
            yield
