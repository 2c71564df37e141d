"""The small VAE interface the engine sees.

A backend wraps one VAE (a diffusers module, the webui's first_stage_model, the built-in linear
approximation, a remote endpoint...) and works in the VAE's **raw** latent space: scaling to and from
the sampler's space is the engine's job, with the constants the backend reports (or a file overrides).
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from lib_vaebatch.devices import dtype_supported
from lib_vaebatch.families import Family
from lib_vaebatch.tiling.program import Program, TilingUnsupportedError

if TYPE_CHECKING:
    from lib_vaebatch.tiling import TileSettings

Op = Literal["decode", "encode"]

#: Planned peak working memory of the SD-family AutoencoderKL: per output pixel (decode) or input
#: pixel (encode) and byte of dtype, plus a fixed amount per call. From the peak RSS of decodes and
#: encodes at 256² and 512² on CPU (a linear fit gives ~920 B/px + ~130 MiB for decode, ~640 B/px
#: + ~10 MiB for encode; bench/bench_memory.py), with headroom.
SD_DECODE_BYTES_PER_PIXEL = 1250.0
SD_ENCODE_BYTES_PER_PIXEL = 850.0
SD_DECODE_FIXED_BYTES = 160 << 20
SD_ENCODE_FIXED_BYTES = 64 << 20

#: ``VAEBATCH_CPU_CHUNK=N``: at most N samples per chunk on the CPU (see ``max_efficient_chunk``).
CPU_CHUNK_ENV = "VAEBATCH_CPU_CHUNK"


@dataclass
class Moments:
    """A diagonal Gaussian posterior over raw latents; ``logvar`` is None for deterministic encoders."""

    mean: torch.Tensor
    logvar: torch.Tensor | None = None


class TilingUnavailableError(RuntimeError):
    """The backend has no tiled path (the engine then reports the sample as failed)."""


class VAEBackend(ABC):
    """One VAE as the engine uses it.

    Subclasses set ``name``, ``family`` and ``family_source`` and implement :meth:`decode`,
    :meth:`encode` and :meth:`set_dtype`. Inputs may come on any device and dtype; outputs are on
    :attr:`device` in :attr:`dtype`.
    """

    name: str = "vae"
    family: Family
    family_source: str = "given"
    #: True for approximations (labelled "preview quality" wherever they are used).
    preview: bool = False
    #: Pixels per latent along each side.
    downscale: int = 8
    #: Short file hash for metadata (webui-style 10 hex digits), when the VAE came from a file.
    file_hash: str | None = None

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype: ...

    @property
    def latent_channels(self) -> int:
        return self.family.latent_channels

    @property
    def scaling_factor(self) -> float:
        return self.family.scaling_factor

    @property
    def shift_factor(self) -> float:
        return self.family.shift_factor

    @property
    def display_name(self) -> str:
        return f"{self.name} (preview quality)" if self.preview else self.name

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw latents ``[B, C, h, w]`` to pixels ``[B, 3, h*8, w*8]`` in [-1, 1] (not clamped)."""

    @abstractmethod
    def encode(self, pixels: torch.Tensor) -> Moments:
        """Pixels ``[B, 3, H, W]`` in [-1, 1] to the posterior over raw latents ``[B, C, H/8, W/8]``."""

    @abstractmethod
    def set_dtype(self, dtype: torch.dtype) -> None:
        """Run later decodes/encodes in ``dtype`` (casts the weights)."""

    def supports_dtype(self, dtype: torch.dtype) -> bool:
        return dtype_supported(self.device, dtype)

    def bytes_per_pixel(self, op: Op) -> float:
        """Peak working memory per output pixel (decode) or input pixel (encode), per byte of dtype
        (default: the SD-family AutoencoderKL's; see docs/engine.md)."""
        return SD_DECODE_BYTES_PER_PIXEL if op == "decode" else SD_ENCODE_BYTES_PER_PIXEL

    def fixed_bytes(self, op: Op) -> int:
        """Working memory per call that does not grow with the chunk (workspaces, scratch)."""
        return SD_DECODE_FIXED_BYTES if op == "decode" else SD_ENCODE_FIXED_BYTES

    def attention_tokens(self, op: Op, pixels: int) -> int:
        """Tokens of the single mid-block attention (its score matrix may be materialised)."""
        return pixels // (self.downscale * self.downscale)

    def max_efficient_chunk(self, op: Op) -> int | None:
        """Largest chunk worth running at once, regardless of memory (None: memory decides).

        None for module VAEs on every device, the CPU included: there a batch of 4 in the layout
        the probe keeps (lib_vaebatch/layout.py) decodes faster per image than 4 single-sample calls
        (issue 13: a plain channels-last decode of the whole batch was ahead of the engine's
        one-sample chunks), and the memory model keeps the chunk within free RAM.
        ``VAEBATCH_CPU_CHUNK=N`` caps CPU chunks at N for the whole process (the test suite sets 1,
        so the host glue tests compare with the hosts' own one-at-a-time loops).
        """
        if self.device.type == "cpu" and (fixed := os.environ.get(CPU_CHUNK_ENV, "").strip()):
            with contextlib.suppress(ValueError):
                return max(1, int(fixed))
        return None

    def free_bytes(self) -> int | None:
        """Bytes free for this VAE's work as its host's memory manager sees them (Forge), or None
        to let the engine ask the device."""
        return None

    def reserve(self, op: Op, pixels: int) -> None:
        """Called once before a job of ``op`` over samples of ``pixels`` pixels (e.g. to load the
        VAE through a host's memory manager); a no-op by default."""
        return

    def tiling_program(self, op: Op) -> Program:
        """The encoder/decoder as a step program for the tiled executors (see lib_vaebatch.tiling).
        Backends whose VAE is a torch module in diffusers or ldm/sgm/SD3 layout return it here."""
        raise TilingUnavailableError(f"{self.name}: tiled {op} is not available for this backend")

    def supports_tiling(self, op: Op) -> bool:
        """Whether :meth:`decode_tiled` / :meth:`encode_tiled` work for this backend."""
        try:
            self.tiling_program(op)
        except (TilingUnavailableError, TilingUnsupportedError):
            return False
        return True

    def decode_tiled(self, latents: torch.Tensor, settings: TileSettings) -> torch.Tensor:
        """Decode raw latents in tiles: after out-of-memory at chunk size 1, or on request."""
        from lib_vaebatch.tiling import run_tiled

        z = latents.to(self.device, self.dtype)
        return run_tiled(self.tiling_program("decode"), z, settings, key=(id(self), "decode"))

    def encode_tiled(self, pixels: torch.Tensor, settings: TileSettings) -> Moments:
        """Encode in tiles (see :meth:`decode_tiled`); the program ends with the posterior's moments."""
        from lib_vaebatch.tiling import run_tiled

        x = pixels.to(self.device, self.dtype)
        moments = run_tiled(self.tiling_program("encode"), x, settings, key=(id(self), "encode"))
        mean, logvar = moments.chunk(2, dim=1)
        return Moments(mean, logvar.clamp(-30.0, 20.0))

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        """Context for one engine job (no autograd by default)."""
        with torch.no_grad():
            yield

    def prepare_for_speed(self, layout: str = "auto") -> contextlib.AbstractContextManager[None]:
        """Scoped device tuning during a job (cuDNN autotuning, the CPU memory layout chosen by
        measurement; ``layout`` is :attr:`EngineOptions.cpu_layout`); a no-op by default."""
        return contextlib.nullcontext()


def module_tiling_program(module: torch.nn.Module, op: Op) -> Program:
    """The step program of an AutoencoderKL-shaped module (``encoder``/``decoder`` with optional
    ``quant_conv``/``post_quant_conv``), in diffusers or ldm/sgm/SD3 layout."""
    from lib_vaebatch.tiling.program import decoder_program, encoder_program

    if op == "decode":
        return decoder_program(module.decoder, getattr(module, "post_quant_conv", None))
    return encoder_program(module.encoder, getattr(module, "quant_conv", None))


def module_moments(module: torch.nn.Module, x: torch.Tensor) -> Moments:
    """The posterior of an AutoencoderKL-shaped module (``encoder`` and optional ``quant_conv``),
    read off its layers: ldm, sgm, SD3 and Forge's modules expose it differently (or only sample)."""
    h = module.encoder(x)
    quant = getattr(module, "quant_conv", None)
    if quant is not None:
        h = quant(h)
    mean, logvar = h.chunk(2, dim=1)
    return Moments(mean, logvar.clamp(-30.0, 20.0))
