"""File-level jobs shared by the CLI, the demo, the app and the API: encode images into latents
files, and decode latents files into images saved with metadata."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from lib_vaebatch import infotext
from lib_vaebatch.backends.base import VAEBackend
from lib_vaebatch.engine.decode import InputError, check_latents, decode_latents
from lib_vaebatch.engine.encode import EncodeOptions, EncodeResult, encode_images, prepare_images
from lib_vaebatch.engine.options import EngineOptions
from lib_vaebatch.engine.results import BatchResult, SampleReport, Status
from lib_vaebatch.engine.runner import CancelFn, ProgressFn
from lib_vaebatch.families import Family, to_raw
from lib_vaebatch.latents import LatentBatch, LatentFileError, read_latents, write_comfy_latent, write_latents
from lib_vaebatch.naming import SequentialNamer, apply_pattern, standard_tokens
from lib_vaebatch.saving import normalize_format
from lib_vaebatch.writer import ImageWriter, SaveFn, WriteResult, folder_saver, in_order

log = logging.getLogger("vaebatch")


# -- decode ------------------------------------------------------------------------------------
def load_latent_files(
    paths: Sequence[str | Path], channels: int | None = None
) -> tuple[list[LatentBatch], list[LatentFileError]]:
    """Read and validate every file before any decode: readable, 4-D float, a channel count that
    fits the VAE (without one: that some model family has), no NaN/Inf. Returns the good batches and
    one error per bad file."""
    good: list[LatentBatch] = []
    bad: list[LatentFileError] = []
    for path in paths:
        try:
            batch = read_latents(path)
            try:
                check_latents(batch.latents, channels)
            except InputError as exc:
                raise LatentFileError(
                    path, str(exc).removeprefix(f"sample {exc.index}: "), exc.index
                ) from None
            try:
                batch.resolve_family()
            except ValueError as exc:
                raise LatentFileError(path, str(exc)) from None
            good.append(batch)
        except LatentFileError as exc:
            bad.append(exc)
    return good, bad


@dataclass
class SavedImage:
    path: Path
    index: int
    infotext: str
    image: Image.Image | None = None  # with ``keep_images``


@dataclass
class FailedSave:
    """An image that was decoded but could not be written: the picture is kept here."""

    index: int
    message: str  # names the latents file, the sample and the target file
    infotext: str
    image: Image.Image | None
    sample: torch.Tensor | None = None  # only when not even the image could be made


@dataclass
class DecodedFile:
    batch: LatentBatch
    family: Family
    vae: str
    result: BatchResult
    saved: list[SavedImage] = field(default_factory=list)
    save_errors: list[str] = field(default_factory=list)
    failed_saves: list[FailedSave] = field(default_factory=list)


@dataclass
class DecodeJob:
    files: list[DecodedFile]
    cancelled: bool = False

    @property
    def saved(self) -> list[SavedImage]:
        return [s for f in self.files for s in f.saved]

    @property
    def failures(self) -> list[tuple[str, SampleReport]]:
        return [(f.batch.path or "<latents>", r) for f in self.files for r in f.result.reports if not r.done]

    @property
    def save_errors(self) -> list[str]:
        return [e for f in self.files for e in f.save_errors]

    @property
    def failed_saves(self) -> list[FailedSave]:
        return [s for f in self.files for s in f.failed_saves]

    @property
    def ok(self) -> bool:
        return not self.cancelled and not self.failures and not self.save_errors


def sample_status(report: SampleReport) -> str:
    """The ``VAE Batch`` infotext value for one image."""
    parts = ["on" if report.status is Status.OK else f"recovered {report.dtype}"]
    if report.tiled:
        parts.append("tiled")
    return ", ".join(parts)


def decode_infotext(
    batch: LatentBatch, index: int, backend: VAEBackend, family: Family, report: SampleReport
) -> str:
    """The sample's own infotext (if the file carried one) with our keys added."""
    base = batch.parameters[index] if batch.parameters else None
    h, w = batch.latents.shape[-2:]
    params: dict[str, object] = {}
    if not base or "Size" not in infotext.parse(base).params:
        params["Size"] = f"{w * backend.downscale}x{h * backend.downscale}"
    params["VAE Batch"] = sample_status(report)
    params["VAE Batch VAE"] = backend.display_name
    if backend.file_hash:
        params["VAE Batch VAE hash"] = backend.file_hash
    params["VAE Batch family"] = family.name
    return infotext.with_params(base, params)


def _token_values(
    batch: LatentBatch, index: int, backend: VAEBackend, family: Family, text: str
) -> dict[str, object]:
    """What file-name tokens can use for one image (ours, and a host's own save function)."""
    stem = Path(batch.path).stem if batch.path else "latents"
    source = Path(batch.sources[index]).stem if batch.sources and batch.sources[index] else stem
    info = infotext.parse(text)
    h, w = batch.latents.shape[-2:]
    p = info.params
    return {
        "prompt": info.prompt,
        "negative_prompt": info.negative_prompt,
        "seed": p.get("Seed"),
        "steps": p.get("Steps"),
        "cfg": p.get("CFG scale"),
        "sampler": p.get("Sampler"),
        "scheduler": p.get("Schedule type"),
        "model_name": p.get("Model"),
        "model_hash": p.get("Model hash"),
        "denoising": p.get("Denoising strength"),
        "clip_skip": p.get("Clip skip"),
        "width": w * backend.downscale,
        "height": h * backend.downscale,
        "stem": stem,
        "source": source,
        "index": index,
        "batch_number": index,
        "family": family.name,
        "vae_filename": backend.name,
    }


def _decoration(pattern: str | None, values: dict[str, object]) -> str:
    """``pattern`` applied to the image's values; our ``<stem>-<index>`` when there is no pattern,
    or when the image has no seed of its own (the webui drops the pattern without a seed too)."""
    if not pattern or values.get("seed") in (None, ""):
        return apply_pattern("[stem]-[index]", {"stem": str(values["stem"]), "index": str(values["index"])})
    return apply_pattern(pattern, standard_tokens(values))


def decode_batch(
    backend: VAEBackend,
    batch: LatentBatch,
    family: Family,
    *,
    options: EngineOptions | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
    on_sample: Callable[[int, torch.Tensor, SampleReport], None] | None = None,
) -> BatchResult:
    """Decode a latents file's batch with its own scaling (for ``family``); each image goes to
    ``on_sample`` as soon as it is final and is not kept in the result."""
    scale, shift = batch.scaling(family)
    return decode_latents(
        backend,
        batch.latents,
        scaled=batch.scaled,
        scaling_factor=scale if batch.scaled else None,
        shift_factor=shift if batch.scaled else None,
        options=options,
        progress=progress,
        cancel=cancel,
        on_sample=on_sample,
        keep_outputs=False,
    )


def decode_to_folder(
    batches: Sequence[LatentBatch],
    out_dir: str | Path,
    backend_for: Callable[[Family], VAEBackend],
    *,
    options: EngineOptions | None = None,
    pattern: str | None = None,
    fmt: str = "png",
    quality: int = 95,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
    writers: int | None = None,
    max_pending: int | None = None,
    keep_images: bool = False,
    save_fn: SaveFn | None = None,
) -> DecodeJob:
    """Decode each batch and save every good image as soon as it exists, named
    ``NNNNN-<stem>-<index>.<fmt>`` (or by ``pattern``) directly in ``out_dir``, never overwriting.

    Images are converted, encoded and written by ``writers`` background threads (default: up to
    two; 0 writes in this thread) while the next chunk decodes, with at most ``max_pending``
    images waiting (default: twice the writers), so memory stays flat. File numbers follow the
    decode order. A failed write is reported in ``save_errors`` and ``failed_saves`` (which keep
    the image); with ``keep_images`` every saved image is returned too. ``save_fn`` replaces our
    own save (a host's, e.g. the webui's): it gets a :class:`~lib_vaebatch.writer.WriteJob`
    (``image``, ``infotext``, ``values``, ``decoration``, ``fmt``) and is called in decode
    order, one image at a time, still overlapping the decode."""
    fmt = normalize_format(fmt)
    save = folder_saver(SequentialNamer(out_dir), quality=quality) if save_fn is None else in_order(save_fn)
    total = sum(len(b) for b in batches)
    offset = 0
    files: list[DecodedFile] = []
    cancelled = False
    writer = ImageWriter(save, workers=writers, max_pending=max_pending, keep_images=keep_images)
    try:
        for batch in batches:
            if cancel is not None and cancel():
                cancelled = True
                break
            backend = backend_for(batch.resolve_family())
            family = batch.resolve_family(backend.family)
            if family.name != backend.family.name and not (
                {family.name, backend.family.name} <= {"sd1", "sd2"}
            ):
                log.warning(
                    "%s: latents are %s but the VAE is %s; decoding anyway",
                    batch.path,
                    family.name,
                    backend.family.name,
                )
            entry = DecodedFile(batch, family, backend.display_name, BatchResult([], []))
            files.append(entry)

            def submit(
                i: int,
                sample: torch.Tensor,
                report: SampleReport,
                slot: int = len(files) - 1,
                batch: LatentBatch = batch,
                backend: VAEBackend = backend,
                family: Family = family,
            ) -> None:
                text = decode_infotext(batch, i, backend, family, report)
                values = _token_values(batch, i, backend, family, text)
                if sample.device.type != "cpu":
                    sample = sample.cpu()  # free the VAE's memory for the next chunk now
                writer.submit(
                    sample,
                    _decoration(pattern, values),
                    infotext=text,
                    fmt=fmt,
                    values=values,
                    label=f"{batch.path or '<latents>'}: sample {i}",
                    key=(slot, i),
                )

            base = offset

            def file_progress(done: int, _total: int, _text: str, base: int = base) -> None:
                if progress is not None:
                    progress(base + done, total, f"decode {base + done}/{total}")

            entry.result = decode_batch(
                backend,
                batch,
                family,
                options=options,
                progress=file_progress,
                cancel=cancel,
                on_sample=submit,
            )
            offset += len(batch)
            if entry.result.cancelled:
                cancelled = True
                break
    finally:
        # Even when cancelled (or failing), every image already decoded is written.
        results = writer.close(strict=False)
    _collect(files, results)
    return DecodeJob(files, cancelled)


def _collect(files: list[DecodedFile], results: list[WriteResult]) -> None:
    for r in results:
        slot, index = r.key
        entry = files[slot]
        if r.ok and r.path is not None:
            entry.saved.append(SavedImage(r.path, index, r.infotext or "", r.image))
        elif r.ok:  # a host's save that keeps the path to itself
            log.debug("%s: saved by the host", r.label)
        else:
            entry.save_errors.append(r.error or f"{r.label}: could not save")
            entry.failed_saves.append(FailedSave(index, r.error or "", r.infotext or "", r.image, r.sample))


# -- encode ------------------------------------------------------------------------------------
@dataclass
class EncodeJob:
    result: EncodeResult
    written: list[Path]

    @property
    def ok(self) -> bool:
        return self.result.ok and not self.result.cancelled


def output_paths(out: str | Path, sizes: Sequence[tuple[int, int]]) -> dict[tuple[int, int], Path]:
    """``OUT.safetensors`` for one size, ``OUT-<W>x<H>.safetensors`` for several."""
    p = Path(out)
    if p.suffix.lower() != ".safetensors":
        p = p.with_name(p.name + ".safetensors")
    if len(sizes) == 1:
        return {sizes[0]: p}
    return {(w, h): p.with_name(f"{p.stem}-{w}x{h}{p.suffix}") for w, h in sizes}


def encode_to_files(
    backend: VAEBackend,
    images: Sequence[str | Path | bytes | Image.Image],
    out: str | Path,
    *,
    encode_options: EncodeOptions | None = None,
    options: EngineOptions | None = None,
    parameters: Sequence[str] | None = None,
    comfy: bool = False,
    half: bool = False,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
) -> EncodeJob:
    """Encode ``images`` into one latents file per size. Images are all read first (a bad one raises
    :class:`~lib_vaebatch.images.ImageInputError` before anything is written), and existing outputs
    are refused up front unless ``overwrite``."""
    eo = encode_options or EncodeOptions()
    prepared = prepare_images(images, eo)
    sizes = list(dict.fromkeys(img.size for img in prepared))
    targets = output_paths(out, sizes)
    if not overwrite:
        existing = [str(t) for t in targets.values() if t.exists()]
        existing += [
            str(t.with_suffix(".latent"))
            for t in targets.values()
            if comfy and t.with_suffix(".latent").exists()
        ]
        if existing:
            raise FileExistsError(f"{', '.join(existing)} exist(s); not overwritten (use overwrite)")
    result = encode_images(
        backend, prepared, encode_options=eo, options=options, progress=progress, cancel=cancel
    )
    written: list[Path] = []
    for group in result.groups:
        if group.latents.shape[0] == 0:
            continue
        target = targets[(group.width, group.height)]
        batch = LatentBatch(
            latents=group.latents,
            scaled=True,
            family=backend.family.name,
            scaling_factor=backend.scaling_factor,
            shift_factor=backend.shift_factor,
            sources=[Path(s).name for s in group.sources],
            sizes=group.original_sizes,
            vae_name=backend.display_name,
            vae_hash=backend.file_hash,
            parameters=[parameters[i] for i in group.input_indices] if parameters is not None else None,
        )
        written.append(write_latents(target, batch, half=half, overwrite=overwrite))
        if comfy:
            raw = to_raw(group.latents, backend.scaling_factor, backend.shift_factor)
            written.append(write_comfy_latent(target.with_suffix(".latent"), raw, overwrite=overwrite))
    return EncodeJob(result, written)
