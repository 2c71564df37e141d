"""A ComfyUI ``comfy.sd.VAE`` behind the engine's VAE interface.

The engine runs the module's raw ``first_stage_model.decode``/``encode`` on the VAE's device in its
dtype, as ComfyUI's own chunk loop does, but with its own chunking (from ComfyUI's free memory),
NaN/Inf checks, precision ladder and exact tiles; never ``vae.decode()``, which turns an
out-of-memory error into a re-run of the whole batch in ComfyUI's 3-pass averaged tiles.
The VAE is loaded through ComfyUI's memory manager with a request sized by the engine's planner.

ComfyUI's LATENT is raw VAE space (its samplers apply the model's latent format), so this backend
reports a scale of 1 and no shift, and the nodes run the engine on raw latents.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from lib_vaebatch.backends.base import Moments, Op, VAEBackend, module_moments, module_tiling_program
from lib_vaebatch.families import Family, default_family_for_channels
from lib_vaebatch.tiling.program import Program

#: Module classes the engine drives: ComfyUI's SD-family image autoencoders (SD1/SD2/SDXL's
#: ``AutoencoderKL``, SD3/Flux.1's ``AutoencodingEngine``) over its LDM ``Encoder``/``Decoder``.
ENGINE_MODULES = ("AutoencoderKL", "AutoencodingEngine", "AutoencodingEngineLegacy")
ENGINE_PARTS = ("Encoder", "Decoder")
ENGINE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def mm() -> Any:
    """ComfyUI's memory manager (``comfy.model_management``)."""
    import comfy.model_management

    return comfy.model_management


def _ratio(value: Any) -> Any:
    """A spatial ratio: ComfyUI keeps an int for images, a tuple (time, h, w) for video VAEs."""
    if isinstance(value, (tuple, list)):
        return value[-1]
    return value


def hand_back_reason(vae: Any, latents: torch.Tensor | None = None) -> str | None:
    """Why a decode (or, without ``latents``, an encode) with ``vae`` stays with ComfyUI's own, or
    None when the engine can run it."""
    module = getattr(vae, "first_stage_model", None)
    if module is None:
        return "ComfyUI did not recognise this VAE's architecture"
    dim = int(getattr(vae, "latent_dim", 2))
    if dim == 1 or int(getattr(vae, "output_channels", 3)) != 3:
        return "this is an audio or 1-D VAE"
    if dim == 3:
        return "this is a video (3-D) VAE"
    if getattr(vae, "handles_tiling", False) or getattr(module, "comfy_has_chunked_io", False):
        return "this VAE runs its own chunked decode"
    kind = type(module).__name__
    if kind not in ENGINE_MODULES:
        return f"its VAE module is a {kind}"
    for part in ("encoder", "decoder"):
        sub = getattr(module, part, None)
        if type(sub).__name__ not in ENGINE_PARTS:
            return f"its {part} is a {type(sub).__name__}"
    ratio = _ratio(getattr(vae, "upscale_ratio", getattr(vae, "downscale_ratio", 8)))
    if ratio != 8:
        return f"the VAE scales by {ratio}, not 8"
    channels = int(getattr(vae, "latent_channels", 0))
    if channels not in (4, 16):
        return f"the VAE has {channels} latent channels"
    param = next(iter(module.parameters()), None)
    if param is None or param.dtype not in ENGINE_DTYPES:
        return f"its weights are {getattr(param, 'dtype', 'missing')}"
    if latents is not None:
        if latents.ndim != 4:
            return f"the latents are {latents.ndim}-D"
        if int(latents.shape[1]) != channels:
            return f"the latents have {int(latents.shape[1])} channels for a {channels}-channel VAE"
    return None


class ComfyVAE(VAEBackend):
    """``comfy.sd.VAE`` (the object a ComfyUI VAE input carries)."""

    def __init__(self, vae: Any, name: str = "ComfyUI VAE") -> None:
        self.vae = vae
        self.module: torch.nn.Module = vae.first_stage_model
        self.family: Family = default_family_for_channels(int(vae.latent_channels))
        self.family_source = "ComfyUI VAE"
        self.name = name
        #: The dtype ComfyUI built the weights in: a recovery "to fp32" computes in fp32 over these.
        self.stored_dtype: torch.dtype = self.dtype
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
        return 1.0  # ComfyUI's latents are raw VAE space

    @property
    def shift_factor(self) -> float:
        return 0.0

    def set_dtype(self, dtype: torch.dtype) -> None:
        self.module.to(dtype=dtype)

    def restore(self) -> None:
        """Put the weights back in the dtype ComfyUI built them in (ComfyUI caches node outputs
        and reuses the same VAE object for later prompts)."""
        if self.dtype != self.stored_dtype:
            self.module.to(dtype=self.stored_dtype)

    def weights_note(self, dtype_name: str) -> str:
        """What a recovery in ``dtype_name`` really ran: ComfyUI built the weights in its dtype."""
        from lib_vaebatch.devices import dtype_name as name_of

        stored = name_of(self.stored_dtype)
        if dtype_name in ("fp32", "bf16") and stored not in ("fp32", dtype_name):
            return f"{dtype_name} compute over the {stored} weights ComfyUI loaded"
        return ""

    # -- ComfyUI's memory manager ----------------------------------------------------------------
    def reserve(self, op: Op, pixels: int) -> None:
        """Before a job: load the VAE through ComfyUI's memory manager, asking for room for one
        sample as our planner sizes it (ComfyUI's own decode asks for one sample too)."""
        from lib_vaebatch.engine.planner import estimate_bytes

        request = estimate_bytes(self, op, pixels, self.dtype) + self.fixed_bytes(op)
        mm().load_models_gpu(
            [self.vae.patcher],
            memory_required=int(request),
            force_full_load=bool(getattr(self.vae, "disable_offload", False)),
        )

    def free_bytes(self) -> int | None:
        """Free memory as ComfyUI sees it: the patcher's own view where it has one (dynamic VRAM
        accounts for weights it can evict), else the memory manager's."""
        own = getattr(self.vae.patcher, "get_free_memory", None)
        if callable(own):
            return int(own(self.device))
        return int(mm().get_free_memory(self.device))

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        try:
            with torch.no_grad():
                yield
        finally:
            fn = getattr(mm(), "soft_empty_cache", None)
            if fn is not None:
                fn()

    # -- work ----------------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.module.decode(latents.to(self.device, self.dtype))

    def encode(self, pixels: torch.Tensor) -> Moments:
        # The posterior mean, read off the layers (ComfyUI's encode returns its mode: the same).
        return module_moments(self.module, pixels.to(self.device, self.dtype))

    def tiling_program(self, op: Op) -> Program:
        if op not in self._programs:
            self._programs[op] = module_tiling_program(self.module, op)
        return self._programs[op]

    def comfy_tiled_decode(self, raw: torch.Tensor) -> torch.Tensor:
        """ComfyUI's own tiled decode (3 averaged passes: approximate), for the very last rung,
        as ``[B, 3, H, W]`` in [-1, 1] on the CPU."""
        out = self.vae.decode_tiled(raw)  # loads the VAE itself; NHWC in [0, 1]
        return out.movedim(-1, 1).float().cpu() * 2.0 - 1.0
