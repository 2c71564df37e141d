"""Batch decode: latents to images, chunked, checked, recovered."""

from __future__ import annotations

import torch

from lib_vaebatch.backends.base import VAEBackend
from lib_vaebatch.engine.options import EngineOptions
from lib_vaebatch.engine.results import BatchResult
from lib_vaebatch.engine.runner import BatchRunner, CancelFn, ProgressFn, SampleFn
from lib_vaebatch.families import to_raw
from lib_vaebatch.tiling import TileSettings


class InputError(ValueError):
    """Input rejected before any work: the message names the sample and the problem."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


def check_latents(latents: torch.Tensor, channels: int | None = None) -> None:
    """Shape, channel count and finiteness of a latent batch ``[B, C, h, w]``.

    Raises :class:`InputError` naming the first bad sample (and whether it holds NaN or Inf)."""
    if not isinstance(latents, torch.Tensor):
        raise InputError(f"latents must be a tensor, not {type(latents).__name__}")
    if latents.ndim != 4:
        raise InputError(
            f"latents must have shape [batch, channels, height, width], got {list(latents.shape)}"
        )
    if not latents.is_floating_point():
        raise InputError(f"latents must be floating point, got {latents.dtype}")
    b, c, h, w = latents.shape
    if channels is not None and c != channels:
        raise InputError(f"latents have {c} channels but the VAE takes {channels}")
    if h < 1 or w < 1:
        raise InputError(f"latents have an empty spatial size {h}x{w}")
    if b == 0:
        return
    finite = torch.isfinite(latents).flatten(1).all(dim=1)
    if not bool(finite.all()):
        i = int((~finite).nonzero()[0, 0])
        nan = int(torch.isnan(latents[i]).sum())
        inf = int(torch.isinf(latents[i]).sum())
        kinds = " and ".join(k for k, n in (("NaN", nan), ("Inf", inf)) if n)
        bad = int((~finite).sum())
        more = f" ({bad} of {b} samples are non-finite)" if bad > 1 else ""
        raise InputError(f"sample {i}: latents contain {kinds} ({nan} NaN, {inf} Inf values){more}", index=i)


def decode_latents(
    backend: VAEBackend,
    latents: torch.Tensor,
    *,
    scaled: bool = True,
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
    options: EngineOptions | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
    on_sample: SampleFn | None = None,
    keep_outputs: bool = True,
) -> BatchResult:
    """Decode ``latents`` ``[B, C, h, w]`` to images ``[3, 8h, 8w]`` in [-1, 1] (one tensor each).

    ``scaled`` latents are in the sampler's space (as the webui's samples and our latents files
    are); they are un-scaled with ``scaling_factor``/``shift_factor``, by default the backend's.
    Input problems raise :class:`InputError` before anything runs; problems while decoding are
    reported per sample in the result and never lose the other samples. ``on_sample`` sees each
    image as soon as it is final; with ``keep_outputs=False`` the result holds no images (memory
    stays flat for long batches that are saved as they go).
    """
    check_latents(latents, backend.latent_channels)
    scale = float(scaling_factor if scaling_factor is not None else backend.scaling_factor)
    shift = float(shift_factor if shift_factor is not None else backend.shift_factor)
    device = backend.device

    def run(x: torch.Tensor, indices: list[int], tiles: TileSettings | None) -> torch.Tensor:
        # Cast first, then un-scale in the VAE's dtype, in the order the webui does it.
        z = x.to(device=device, dtype=backend.dtype)
        if scaled:
            z = to_raw(z, scale, shift)
        return backend.decode_tiled(z, tiles) if tiles is not None else backend.decode(z)

    h, w = latents.shape[-2:]
    pixels = h * w * backend.downscale * backend.downscale
    runner = BatchRunner(
        backend,
        "decode",
        latents.detach(),
        run,
        pixels=pixels,
        options=options,
        progress=progress,
        cancel=cancel,
        on_sample=on_sample,
        keep_outputs=keep_outputs,
    )
    return runner.run()
