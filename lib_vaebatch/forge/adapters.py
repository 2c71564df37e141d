"""One adapter per Forge backend: how a model's VAE is found, scaled, loaded and freed.

Both backends keep the VAE as ``model.forge_objects.vae``: an object with ``first_stage_model``
(the torch module), ``patcher`` (its memory-manager handle), ``device``, ``vae_dtype`` and
``latent_channels``. They differ in where the latent scaling lives and in the memory manager:

* new backend (Forge 2, Neo): ``first_stage_model.process_out/process_in``;
  ``backend.memory_management``.
* old backend (Classic, reForge): the UNet's ``model_config.latent_format.process_out/process_in``;
  ``ldm_patched.modules.model_management``.

The engine never calls Forge's ``vae.decode`` (it turns an out-of-memory error into a whole-batch
3-pass tiled decode); it runs ``first_stage_model.decode`` itself. :meth:`Adapter.forge_tiled_decode`
is there only for the very last rung, after the engine's own ladder has failed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from lib_vaebatch.forge.detect import ForgeHost

#: Module classes the engine drives (anything else, e.g. TAESD, a video or a Flux.2 VAE, goes back
#: to Forge's own decode).
ENGINE_MODULES = {"new": ("IntegratedAutoencoderKL",), "old": ("AutoencoderKL",)}
ENGINE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class Adapter:
    """What the engine needs from one Forge backend."""

    def __init__(self, host: ForgeHost) -> None:
        self.host = host
        self.mm = host.memory_manager()

    # -- the VAE and its scaling ------------------------------------------------------------
    def vae_of(self, model: Any) -> Any:
        return model.forge_objects.vae

    def scaling(self, model: Any, vae: Any) -> tuple[float, float]:
        raise NotImplementedError

    def to_vae_latent(self, model: Any, vae: Any, z: torch.Tensor) -> torch.Tensor:
        """Sampler-space latents to the VAE's raw latents, exactly as the variant's own
        ``decode_first_stage`` does it (before the cast to the VAE's dtype)."""
        raise NotImplementedError

    # -- the memory manager ----------------------------------------------------------------
    def load(self, vae: Any, memory_required: int) -> None:
        """Load the VAE through Forge's memory manager, asking it to make room for
        ``memory_required`` bytes of working memory (it offloads other models to get it)."""
        self.mm.load_models_gpu([vae.patcher], memory_required=int(memory_required))

    def free_bytes(self, vae: Any) -> int:
        return int(self.mm.get_free_memory(vae.device))

    def empty_cache(self) -> None:
        fn = getattr(self.mm, "soft_empty_cache", None)
        if fn is not None:
            fn()

    # -- what stays with Forge ---------------------------------------------------------------
    def hand_back_reason(self, model: Any, vae: Any, latents: torch.Tensor) -> str | None:
        """Why this decode must stay with Forge's own, or None when the engine can run it."""
        if latents.ndim != 4:
            return f"the latents are {latents.ndim}-D (a video VAE)"
        if getattr(vae, "is_wan", False) or getattr(model, "is_wan", False):
            return "this is a Wan (video) VAE"
        for flag, what in (("is_flux2", "a Flux.2 VAE"), ("is_mugen", "a Mugen VAE")):
            if getattr(vae, flag, False):
                return f"this is {what}"
        ratio = getattr(vae, "upscale_ratio", getattr(vae, "downscale_ratio", 8))
        if ratio != 8:
            return f"the VAE scales by {ratio}, not 8"
        channels = getattr(vae, "latent_channels", None)
        if channels not in (4, 16):
            return f"the VAE has {channels} latent channels"
        if int(latents.shape[1]) != int(channels):
            return f"the latents have {int(latents.shape[1])} channels for a {channels}-channel VAE (packed)"
        module = getattr(vae, "first_stage_model", None)
        kind = type(module).__name__
        if kind not in ENGINE_MODULES[self.host.backend]:
            return f"its VAE module is a {kind}"
        param = next(iter(module.parameters()), None) if isinstance(module, torch.nn.Module) else None
        if param is None or param.dtype not in ENGINE_DTYPES:
            return f"its VAE weights are {getattr(param, 'dtype', 'missing')}"
        return None

    def forge_tiled_decode(self, vae: Any, raw: torch.Tensor) -> torch.Tensor:
        """Forge's own tiled decode (ComfyUI's 3 averaged passes: approximate) of raw latents, as
        ``[B, 3, H, W]`` in [-1, 1] on the CPU."""
        out = vae.decode_tiled(raw)  # loads the VAE itself; NHWC in [0, 1]
        return out.movedim(-1, 1).float().cpu() * 2.0 - 1.0

    # -- VAE files (the Latent Batch tab) ------------------------------------------------------
    def vae_from_file(self, model: Any, path: str | Path) -> Any:
        raise NotImplementedError


def read_vae_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A VAE file's own tensors, container prefix stripped; safetensors, or ``.pt``/``.ckpt`` read
    without unpickling."""
    from lib_vaebatch.backends.keys import extract_vae

    p = Path(path)
    if p.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p), device="cpu")
    else:
        from lib_vaebatch.ptfile import load_pt

        obj = load_pt(p)
        state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
        if not isinstance(state, dict):
            raise ValueError(f"{p.name}: no state dict inside")
    return extract_vae(state)


class NewBackend(Adapter):
    """Forge 2 and Neo: ``backend.*``."""

    def scaling(self, model: Any, vae: Any) -> tuple[float, float]:
        fsm = vae.first_stage_model
        return float(getattr(fsm, "scaling_factor", 0.18215)), float(getattr(fsm, "shift_factor", 0.0) or 0.0)

    def to_vae_latent(self, model: Any, vae: Any, z: torch.Tensor) -> torch.Tensor:
        return vae.first_stage_model.process_out(z)

    def vae_from_file(self, model: Any, path: str | Path) -> Any:
        """A copy of the checkpoint's VAE module (built by Forge's own loader) with the file's
        weights, wrapped in Forge's VAE class so the memory manager moves it."""
        import importlib

        from lib_vaebatch.backends.keys import detect_naming, diffusers_to_ldm

        state = read_vae_state(path)
        if detect_naming(state) == "diffusers":
            state = diffusers_to_ldm(state)
        base = self.vae_of(model)
        module = copy.deepcopy(base.first_stage_model).to("cpu")
        module.load_state_dict(state, strict=True)
        vae_cls = importlib.import_module("backend.patcher.vae").VAE
        return vae_cls(model=module, dtype=base.vae_dtype)


class OldBackend(Adapter):
    """Forge Classic and reForge: ``ldm_patched.*``."""

    def latent_format(self, model: Any) -> Any:
        return model.forge_objects.unet.model.model_config.latent_format

    def scaling(self, model: Any, vae: Any) -> tuple[float, float]:
        fmt = self.latent_format(model)
        return float(fmt.scale_factor), float(getattr(fmt, "shift_factor", 0.0) or 0.0)

    def to_vae_latent(self, model: Any, vae: Any, z: torch.Tensor) -> torch.Tensor:
        return self.latent_format(model).process_out(z)

    def vae_from_file(self, model: Any, path: str | Path) -> Any:
        """The variant's own VAE class (``ldm_patched.modules.sd.VAE``), which builds the module,
        converts diffusers keys and registers a patcher with the memory manager."""
        import importlib

        vae_cls = importlib.import_module("ldm_patched.modules.sd").VAE
        return vae_cls(sd=read_vae_state(path))


def adapter_for(host: ForgeHost) -> Adapter:
    return NewBackend(host) if host.backend == "new" else OldBackend(host)
