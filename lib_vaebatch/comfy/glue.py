"""What the ComfyUI nodes do with a VAE and a batch: the engine's decode and encode over ComfyUI's
``VAE`` object, in ComfyUI's data conventions (LATENT dicts of raw latents, IMAGE ``[B, H, W, 3]``
in [0, 1] on the intermediate device), with ComfyUI's progress bar and interrupt, and a report of
what happened.

* Decode: latents a sampler made non-finite are reported (no VAE retry can fix them) and come
  back black, as ComfyUI's own decode would give them; the others go through the engine. A sample
  the engine cannot decode even in its smallest tiles goes to ComfyUI's own tiled decode
  (approximate, and labelled so).
* What the engine does not drive yet (video and audio VAEs, unknown architectures) is handed back
  to ComfyUI's own ``decode``/``encode``, with one line saying why.
* Interrupt: the engine stops after the current chunk (or between tiles); the node then raises
  ComfyUI's own interrupt, so the prompt ends as "interrupted", not as an error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lib_vaebatch.backends.base import VAEBackend
from lib_vaebatch.comfy.backend import ComfyVAE, hand_back_reason, mm
from lib_vaebatch.comfy.options import engine_options
from lib_vaebatch.devices import dtype_name
from lib_vaebatch.engine.decode import decode_latents
from lib_vaebatch.engine.encode import encode_pixels
from lib_vaebatch.engine.results import BatchResult, Status
from lib_vaebatch.host import Reporter

PREFIX = "VAE Batch"


def comfy_reporter(node_id: str | None, total: int) -> Reporter:
    """The seam's :class:`Reporter` for a ComfyUI node: progress on the node's bar (ComfyUI's
    ``ProgressBar``), stop on ComfyUI's interrupt flag. The bar's hook raises ComfyUI's interrupt
    itself; inside the engine that would read as a failed chunk, so an update is skipped once the
    flag is up (and the flag put back if the hook took it), and the node raises after the engine
    has stopped."""
    import comfy.utils

    bar = comfy.utils.ProgressBar(max(1, total), node_id=node_id)
    manager = mm()

    def progress(done: int, of: int, _text: str = "") -> None:
        if manager.processing_interrupted():
            return
        try:
            bar.update_absolute(done, max(1, of))
        except manager.InterruptProcessingException:
            manager.interrupt_current_processing(True)

    return Reporter(progress=progress, cancel=manager.processing_interrupted)


def raise_if_interrupted() -> None:
    mm().throw_exception_if_processing_interrupted()


def latent_tensor(samples: Any) -> torch.Tensor:
    """The latent batch of a LATENT input (a dict with ``samples``; newer ComfyUI may nest it)."""
    z = samples["samples"] if isinstance(samples, Mapping) else samples
    if getattr(z, "is_nested", False):
        z = z.unbind()[0]
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{PREFIX}: a LATENT holds a tensor under 'samples', not {type(z).__name__}")
    return z


def _flatten_frames(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI's VAEDecode turns a video's ``[B, T, H, W, C]`` into ``[B*T, H, W, C]``."""
    return images.reshape(-1, *images.shape[-3:]) if images.ndim == 5 else images


@dataclass
class Decoded:
    images: torch.Tensor
    report: str


def _size(z: torch.Tensor, ratio: int = 8) -> str:
    return f"{z.shape[-1] * ratio}x{z.shape[-2] * ratio}"


def decode(vae: Any, samples: Any, values: Mapping[str, Any], node_id: str | None = None) -> Decoded:
    """Decode a LATENT with the engine (see the module doc); the IMAGE and the report."""
    z = latent_tensor(samples)
    own = getattr(vae, "vaebatch_backend", None)  # a VAE of ours (the Remote VAE node)
    why = hand_back_reason(vae, z) if own is None else None
    if why is not None:
        images = _flatten_frames(vae.decode(z))
        return Decoded(images, f"{PREFIX}: handed back to ComfyUI's own decode: {why}")
    options = engine_options(values)
    n = int(z.shape[0])
    finite = torch.isfinite(z.reshape(n, -1)).all(dim=1).tolist() if n else []
    good = [i for i in range(n) if finite[i]]
    lines = [f"{PREFIX} decode: {n} image(s) of {_size(z)}"]
    for i in range(n):
        if not finite[i]:
            nan, inf = int(torch.isnan(z[i]).sum()), int(torch.isinf(z[i]).sum())
            lines.append(
                f"image {i}: the latent itself is non-finite ({nan} NaN, {inf} Inf values), as the "
                "sampler made it: no VAE retry can fix that; it comes back black"
            )
    backend: VAEBackend = own if own is not None else ComfyVAE(vae)
    outputs: list[torch.Tensor | None] = [None] * n
    result: BatchResult | None = None
    if good:
        reporter = comfy_reporter(node_id, len(good))
        try:
            result = decode_latents(
                backend, z[good], scaled=False, options=options, progress=reporter, cancel=reporter.cancelled
            )
        finally:
            _restore(backend)
        if result.cancelled:
            raise_if_interrupted()
        lines += _describe(result, backend, good)
        for k, i in enumerate(good):
            outputs[i] = result.outputs[k]
        for k, rep in enumerate(result.reports):
            if rep.status is Status.FAILED and not rep.message.startswith("non-finite"):
                outputs[good[k]] = _last_resort(backend, z[good[k] : good[k] + 1], lines, good[k])
    h, w = (int(d) * backend.downscale for d in z.shape[-2:])
    images = torch.zeros((n, h, w, 3), dtype=torch.float32)
    for i, out in enumerate(outputs):
        if out is not None:  # as ComfyUI's process_output: (x + 1) / 2 clamped to [0, 1]
            images[i] = torch.clamp((out.float() + 1.0) / 2.0, min=0.0, max=1.0).movedim(0, -1)
    return Decoded(images.to(mm().intermediate_device()), "\n".join(lines))


def _restore(backend: VAEBackend) -> None:
    if isinstance(backend, ComfyVAE):
        backend.restore()


def _last_resort(backend: VAEBackend, raw: torch.Tensor, lines: list[str], index: int) -> torch.Tensor:
    try:
        if not isinstance(backend, ComfyVAE):
            raise RuntimeError("no ComfyUI tiles to fall back on for this VAE")
        with torch.no_grad():
            out = backend.comfy_tiled_decode(raw)[0]
    except Exception as exc:
        report = "\n".join(lines)
        raise RuntimeError(
            f"{report}\nimage {index}: not decoded even in ComfyUI's own tiles ({type(exc).__name__}: {exc})"
        ) from exc
    lines.append(
        f"image {index}: every tiled path of VAE Batch ran out of memory; decoded by ComfyUI's own "
        "3-pass tiles (approximate)"
    )
    return out


def _describe(result: BatchResult, backend: VAEBackend, indices: Sequence[int]) -> list[str]:
    """The engine's part of the report: chunks, what was recovered and how, tiles and events."""
    chunks = result.chunk_sizes
    start = result.start_dtype or dtype_name(backend.dtype)
    head = f"  {len(chunks)} chunk(s)" + (f" of up to {max(chunks)}" if chunks else "") + f" in {start}"
    summary = result.summary()
    lines = [f"{head}: " + ("all finite, untiled" if summary == "on" else summary)]
    for rep in result.reports:
        i = indices[rep.index]
        if rep.status is Status.RECOVERED:
            note = backend.weights_note(rep.dtype or "") if isinstance(backend, ComfyVAE) else ""
            said = rep.message or f"recovered in {rep.dtype}"
            lines.append(f"  image {i}: {said}" + (f" ({note})" if note else ""))
        elif rep.status is Status.FAILED:
            lines.append(f"  image {i}: {rep.message}")
        if rep.tiled:
            lines.append(f"  image {i}: {rep.tile_mode or 'exact'} tiles")
    lines += [f"  {event}" for event in result.events]
    return lines


# -- encode ------------------------------------------------------------------------------------------
def crop_to_ratio(pixels: torch.Tensor, ratio: int = 8) -> torch.Tensor:
    """``[B, H, W, C]`` centre-cropped to multiples of ``ratio``, as ComfyUI's VAE.encode crops."""
    for dim in (1, 2):
        size = int(pixels.shape[dim])
        keep = (size // ratio) * ratio
        if keep != size:
            pixels = pixels.narrow(dim, (size % ratio) // 2, keep)
    return pixels


@dataclass
class Encoded:
    latents: torch.Tensor  # raw, [B, C, h, w], float32 on the intermediate device
    report: str


def encode(vae: Any, pixels: torch.Tensor, values: Mapping[str, Any], node_id: str | None = None) -> Encoded:
    """Encode an IMAGE batch (alpha dropped, cropped to the VAE's multiple, the posterior mean)."""
    rgb = pixels[..., :3]
    own = getattr(vae, "vaebatch_backend", None)  # a VAE of ours (the Remote VAE node)
    why = hand_back_reason(vae) if own is None else None
    if why is not None:
        return Encoded(vae.encode(rgb), f"{PREFIX}: handed back to ComfyUI's own encode: {why}")
    backend: VAEBackend = own if own is not None else ComfyVAE(vae)
    rgb = crop_to_ratio(rgb, backend.downscale)
    n = int(rgb.shape[0])
    lines = [f"{PREFIX} encode: {n} image(s) of {rgb.shape[2]}x{rgb.shape[1]}"]
    if rgb.shape[1] < backend.downscale or rgb.shape[2] < backend.downscale:
        raise ValueError(f"{PREFIX}: an image of {pixels.shape[2]}x{pixels.shape[1]} is smaller than 8x8")
    x = rgb.movedim(-1, 1).float() * 2.0 - 1.0  # ComfyUI's process_input, in fp32
    options = engine_options({k: v for k, v in values.items() if k != "nan_check"} | {"nan_check": True})
    reporter = comfy_reporter(node_id, n)
    try:
        result = encode_pixels(backend, x, options=options, progress=reporter, cancel=reporter.cancelled)
    finally:
        _restore(backend)
    if result.cancelled:
        raise_if_interrupted()
    lines += _describe(result, backend, range(n))
    out = []
    for rep, z in zip(result.reports, result.outputs, strict=True):
        if z is None:  # the engine's every path failed: ComfyUI's own encode of that image
            z = vae.encode(rgb[rep.index : rep.index + 1])[0]
            lines.append(f"  image {rep.index}: encoded by ComfyUI's own encode")
        out.append(z.float().cpu())
    latents = torch.stack(out) if out else torch.zeros((0, backend.latent_channels, 0, 0))
    return Encoded(latents.to(mm().intermediate_device()), "\n".join(lines))


def encode_images(vae: Any, inputs: Sequence[torch.Tensor], values: Mapping[str, Any],
                  node_id: str | None = None) -> tuple[list[dict[str, torch.Tensor]], str]:  # fmt: skip
    """The images of every input (each an IMAGE batch), each at its own size: the images of one
    size are encoded together, and the LATENTs come back in input order, one per run of
    consecutive images of the same size (all one LATENT when they all share a size)."""
    images = [img for batch in inputs for img in batch]
    if not images:
        raise ValueError(f"{PREFIX}: no images to encode")
    cropped = [crop_to_ratio(img[None, ..., :3])[0] for img in images]
    sizes = [tuple(c.shape[:2]) for c in cropped]
    latents: list[torch.Tensor | None] = [None] * len(images)
    reports = []
    for size in dict.fromkeys(sizes):  # each size once, in order of first appearance
        members = [i for i, s in enumerate(sizes) if s == size]
        enc = encode(vae, torch.stack([cropped[i] for i in members]), values, node_id)
        reports.append(enc.report)
        for k, i in enumerate(members):
            latents[i] = enc.latents[k]
    runs: list[list[int]] = []
    for i, size in enumerate(sizes):
        if runs and sizes[runs[-1][0]] == size:
            runs[-1].append(i)
        else:
            runs.append([i])
    out = [{"samples": torch.stack([latents[i] for i in run])} for run in runs]  # type: ignore[misc]
    head = (
        f"{PREFIX}: {len(images)} image(s) from {len(inputs)} input(s), {len(set(sizes))} size(s), "
        f"{len(out)} LATENT(s) in input order"
    )
    return out, "\n".join([head, *reports])
