"""Batch encode: images of any sizes to latents, grouped by size, with the decode machinery."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from lib_vaebatch.backends.base import VAEBackend
from lib_vaebatch.engine.options import EngineOptions
from lib_vaebatch.engine.results import BatchResult, SampleReport, Status
from lib_vaebatch.engine.runner import BatchRunner, CancelFn, ProgressFn
from lib_vaebatch.families import to_scaled
from lib_vaebatch.images import DEFAULT_MAX_PIXELS, Alpha, Fit, PreparedImage, prepare_image, to_unit_range
from lib_vaebatch.tiling import TileSettings


@dataclass
class EncodeOptions:
    """How images become latents."""

    fit: Fit = "crop"
    alpha: Alpha = "composite"
    background: str = "#ffffff"
    #: False: the posterior mean (deterministic). True: a sample, seeded per image.
    sample: bool = False
    seed: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.fit not in ("crop", "resize"):
            raise ValueError(f"fit must be 'crop' or 'resize', not {self.fit!r}")
        if self.alpha not in ("composite", "drop"):
            raise ValueError(f"alpha must be 'composite' or 'drop', not {self.alpha!r}")


@dataclass
class EncodedGroup:
    """The images of one size. ``latents`` holds the successful ones, in the sampler's space."""

    width: int
    height: int
    latents: torch.Tensor
    sources: list[str]
    original_sizes: list[tuple[int, int]]
    input_indices: list[int]
    result: BatchResult


@dataclass
class EncodeResult:
    groups: list[EncodedGroup]
    reports: list[SampleReport]  # indexed like the input images
    cancelled: bool = False
    events: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.done for r in self.reports)


def encode_pixels(
    backend: VAEBackend,
    pixels: torch.Tensor,
    *,
    sample: bool = False,
    seed: int = 0,
    seed_offsets: Sequence[int] | None = None,
    options: EngineOptions | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
) -> BatchResult:
    """Encode same-size images ``[B, 3, H, W]`` (uint8, or float in [-1, 1]) to scaled latents.

    With ``sample`` the latent is drawn from the posterior with noise from a CPU generator seeded
    ``seed + seed_offsets[i]`` per image, so results do not depend on chunking or device.
    """
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must have shape [batch, 3, height, width], got {list(pixels.shape)}")
    h, w = pixels.shape[-2:]
    if h % backend.downscale or w % backend.downscale:
        raise ValueError(f"image size {w}x{h} is not a multiple of {backend.downscale}")
    offsets = list(seed_offsets) if seed_offsets is not None else list(range(pixels.shape[0]))
    device = backend.device
    scale, shift = backend.scaling_factor, backend.shift_factor

    def run(x: torch.Tensor, indices: list[int], tiles: TileSettings | None) -> torch.Tensor:
        px = to_unit_range(x) if x.dtype == torch.uint8 else x.to(torch.float32)
        px = px.to(device)
        moments = backend.encode_tiled(px, tiles) if tiles is not None else backend.encode(px)
        z = moments.mean.float()
        if sample and moments.logvar is not None:
            noise = torch.stack(
                [
                    torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(seed + offsets[i]))
                    for i in indices
                ]
            ).to(device)
            z = z + torch.exp(0.5 * moments.logvar.float().clamp(-30.0, 20.0)) * noise
        return to_scaled(z, scale, shift)

    runner = BatchRunner(
        backend, "encode", pixels, run, pixels=h * w, options=options, progress=progress, cancel=cancel
    )
    return runner.run()


def prepare_images(
    images: Sequence[str | Path | bytes | Image.Image], encode_options: EncodeOptions | None = None
) -> list[PreparedImage]:
    """Load and prepare every image first, so a bad file is reported before anything is encoded."""
    eo = encode_options or EncodeOptions()
    return [
        prepare_image(
            img,
            name=None if not isinstance(img, bytes) else f"<image {i}>",
            fit=eo.fit,
            alpha=eo.alpha,
            background=eo.background,
            max_pixels=eo.max_pixels,
        )
        for i, img in enumerate(images)
    ]


def encode_images(
    backend: VAEBackend,
    images: Sequence[str | Path | bytes | Image.Image] | Sequence[PreparedImage],
    *,
    encode_options: EncodeOptions | None = None,
    options: EngineOptions | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
) -> EncodeResult:
    """Encode images of any sizes; one :class:`EncodedGroup` per size, in order of first appearance."""
    eo = encode_options or EncodeOptions()
    prepared = (
        list(images)  # type: ignore[arg-type]
        if images and all(isinstance(i, PreparedImage) for i in images)
        else prepare_images(images, eo)  # type: ignore[arg-type]
    )
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(prepared):
        by_size.setdefault(img.size, []).append(i)

    total = len(prepared)
    reports = [SampleReport(i) for i in range(total)]
    groups: list[EncodedGroup] = []
    events: list[str] = []
    done_before = 0
    cancelled = False
    for (w, h), members in by_size.items():
        if cancelled or (cancel is not None and cancel()):
            cancelled = True
            break
        base = done_before

        def group_progress(done: int, _total: int, _text: str, base: int = base) -> None:
            if progress is not None:
                progress(base + done, total, f"encode {base + done}/{total}")

        batch = torch.stack([prepared[i].pixels for i in members])
        result = encode_pixels(
            backend,
            batch,
            sample=eo.sample,
            seed=eo.seed,
            seed_offsets=members,
            options=options,
            progress=group_progress,
            cancel=cancel,
        )
        events += [f"{w}x{h}: {e}" for e in result.events]
        keep = [k for k, r in enumerate(result.reports) if r.done]
        for k, rep in enumerate(result.reports):
            reports[members[k]] = dataclasses.replace(rep, index=members[k])
        latents = (
            torch.stack([result.outputs[k] for k in keep])  # type: ignore[misc]
            if keep
            else torch.empty(0, backend.latent_channels, h // backend.downscale, w // backend.downscale)
        )
        groups.append(
            EncodedGroup(
                w,
                h,
                latents,
                [prepared[members[k]].source for k in keep],
                [prepared[members[k]].original_size for k in keep],
                [members[k] for k in keep],
                result,
            )
        )
        done_before += len(members)
        cancelled = cancelled or result.cancelled
    for rep in reports:
        if rep.status is Status.CANCELLED and not rep.message:
            rep.message = "cancelled before it ran"
    return EncodeResult(groups, reports, cancelled, events)
