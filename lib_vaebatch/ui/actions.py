"""What the "Latent Batch" buttons do, free of gradio and of the webui: gather inputs (uploads and
server-side folders), run the engine through a :class:`~lib_vaebatch.host.Host`, save, and
describe the outcome.

The webui tab, the standalone app and the HTTP API call these with their own host."""

from __future__ import annotations

import html
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from lib_vaebatch.backends.base import VAEBackend
from lib_vaebatch.devices import parse_dtype
from lib_vaebatch.engine.encode import EncodeOptions
from lib_vaebatch.engine.options import EngineOptions
from lib_vaebatch.families import Family
from lib_vaebatch.host import Host, Reporter, UserError, checked_engine_options
from lib_vaebatch.images import IMAGE_SUFFIXES, ImageInputError, parse_color
from lib_vaebatch.latents import SUFFIXES as LATENT_SUFFIXES
from lib_vaebatch.latents import LatentFileError
from lib_vaebatch.naming import next_sequence_number
from lib_vaebatch.saving import read_infotext

log = logging.getLogger("vaebatch")

#: Latent file types the Decode side accepts (``.pt`` only through the loader that never runs code).
DECODE_SUFFIXES = LATENT_SUFFIXES
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MAX_FILES = 10_000


# -- inputs -------------------------------------------------------------------------------------
def _folder_files(host: Host, folder: str, suffixes: Sequence[str], what: str) -> list[Path]:
    folder = (folder or "").strip()
    if not folder:
        return []
    if host.hide_dirs:
        raise UserError("server-side folders are disabled on this server (--hide-ui-dir-config)")
    p = Path(folder).expanduser()
    if not p.is_dir():
        raise UserError(f"input folder {folder!r} does not exist or is not a folder")
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in suffixes)
    if not files:
        raise UserError(f"no {what} in {folder!r} (looked for {', '.join(suffixes)})")
    return files


def gather(host: Host, uploads: Sequence[str], folder: str, suffixes: Sequence[str], what: str) -> list[Path]:
    paths = [Path(u) for u in uploads] + _folder_files(host, folder, suffixes, what)
    if not paths:
        raise UserError(f"no {what}: upload some, or name an input folder")
    if len(paths) > MAX_FILES:
        raise UserError(f"{len(paths)} files is more than the {MAX_FILES} one job takes")
    return paths


def _with_dtype(backend: VAEBackend, precision: str) -> Callable[[], None]:
    """Switch ``backend`` to ``precision`` for one job; returns the undo."""
    if not precision or precision == "auto":
        return lambda: None
    try:
        dtype = parse_dtype(precision)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if not backend.supports_dtype(dtype):
        raise UserError(f"{precision} is not supported on {backend.device}")
    before = backend.dtype
    backend.set_dtype(dtype)
    return lambda: backend.set_dtype(before)


def _esc(text: object) -> str:
    return html.escape(str(text))


def _log_html(lines: Sequence[tuple[str, str]]) -> str:
    """``(kind, text)`` lines (kind: ok, warn, error) as the result box's HTML."""
    items = "".join(f"<li class='vaebatch-{k}'>{_esc(t)}</li>" for k, t in lines)
    return f"<ul class='vaebatch-log'>{items}</ul>"


# -- encode -------------------------------------------------------------------------------------
@dataclass
class EncodeRequest:
    uploads: list[str] = field(default_factory=list)
    folder: str = ""
    vae: str = ""
    fit: str = "crop"
    alpha: str = "composite"
    background: str = "#ffffff"
    sample: bool = False
    seed: int = 0
    precision: str = "auto"
    comfy: bool = False
    half: bool = False


@dataclass
class EncodeOutcome:
    files: list[Path]
    previews: list[tuple[str, str]]  # (image path, caption)
    log_html: str
    ok: bool
    cancelled: bool = False


def encode(host: Host, req: EncodeRequest, report: Reporter) -> EncodeOutcome:
    from lib_vaebatch.jobs import encode_to_files

    paths = gather(host, req.uploads, req.folder, IMAGE_SUFFIXES, "images")
    try:
        parse_color(req.background)
        eo = EncodeOptions(
            fit=req.fit, alpha=req.alpha, background=req.background, sample=req.sample, seed=int(req.seed)
        )
    except (TypeError, ValueError) as exc:
        raise UserError(str(exc)) from None
    backend = host.backend(req.vae or host.default_vae())
    parameters = [read_infotext_quiet(p) or "" for p in paths]
    out_dir = host.output_dir() / "latents"
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{next_sequence_number(out_dir):05}-latents.safetensors"
    undo = _with_dtype(backend, req.precision)
    try:
        job = encode_to_files(
            backend,
            paths,
            target,
            encode_options=eo,
            parameters=parameters,
            comfy=req.comfy,
            half=req.half,
            progress=report,
            cancel=report.cancelled,
        )
    except ImageInputError as exc:
        raise UserError(str(exc)) from None
    finally:
        undo()
    lines: list[tuple[str, str]] = []
    done = sum(r.done for r in job.result.reports)
    lines.append(("ok", f"encoded {done}/{len(paths)} image(s) with {backend.display_name}"))
    lines += [("ok", f"wrote {p.name}") for p in job.written]
    for rep in job.result.reports:
        if not rep.done:
            lines.append(("error", f"{paths[rep.index].name}: {rep.status.value}: {rep.message}"))
    if job.result.cancelled:
        lines.append(("warn", "interrupted: the images encoded so far are in the files above"))
    names = {rep.index for rep in job.result.reports if rep.done}
    previews = [(str(p), p.name) for i, p in enumerate(paths) if i in names]
    return EncodeOutcome(list(job.written), previews, _log_html(lines), job.ok, job.result.cancelled)


def read_infotext_quiet(path: Path) -> str | None:
    """The infotext an input image carries (webui PNG/JPEG/WebP), or None."""
    try:
        return read_infotext(path)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return None  # the encode itself reports an unreadable image, with its name


# -- decode -------------------------------------------------------------------------------------
@dataclass
class DecodeRequest:
    uploads: list[str] = field(default_factory=list)
    folder: str = ""
    vae: str = ""
    fmt: str = "png"
    pattern: str = ""
    precision: str = "auto"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DecodeOutcome:
    images: list[tuple[str, str]]  # (saved path, caption)
    infotexts: list[str]
    log_html: str
    ok: bool
    cancelled: bool = False


def engine_options(values: dict[str, Any]) -> EngineOptions:
    try:
        return checked_engine_options(values)
    except ValueError as exc:
        raise UserError(f"engine options: {exc}") from None


def decode(host: Host, req: DecodeRequest, report: Reporter) -> DecodeOutcome:
    from lib_vaebatch.jobs import decode_to_folder, load_latent_files

    paths = gather(host, req.uploads, req.folder, DECODE_SUFFIXES, "latent files")
    options = engine_options(req.options)
    label = req.vae or host.default_vae()
    host.backend(label)  # an unknown or unloadable VAE is an error before any file is read
    loaded, errors = load_latent_files(paths, None)
    batches = []
    for batch in loaded:  # the channel count is checked against the VAE for the file's own family
        try:
            b = host.backend(label, batch.resolve_family())
        except ValueError as exc:  # the host cannot give that VAE for the file's family
            errors.append(LatentFileError(batch.path or "latents", str(exc)))
            continue
        if batch.channels != b.latent_channels:
            errors.append(
                LatentFileError(
                    batch.path or "latents",
                    f"{batch.channels} channels, but the VAE {b.display_name} takes {b.latent_channels}",
                )
            )
        else:
            batches.append(batch)
    if (
        batches
        and options.tiling == "always"
        and not all(host.backend(label, b.resolve_family()).supports_tiling("decode") for b in batches)
    ):
        raise UserError(f"tiling 'always' is not possible with the VAE {label}: choose auto or never")
    lines: list[tuple[str, str]] = [("error", str(e)) for e in errors]
    if not batches:
        raise UserError("; ".join(str(e) for e in errors) or "nothing to decode")
    backends: dict[str, VAEBackend] = {}
    undos: list[Callable[[], None]] = []

    def backend_for(family: Family) -> VAEBackend:
        if family.name not in backends:
            b = host.backend(label, family)
            if all(b is not o for o in backends.values()):
                undos.append(_with_dtype(b, req.precision))
            backends[family.name] = b
        return backends[family.name]

    try:
        job = decode_to_folder(
            batches,
            host.output_dir() / "images",
            backend_for,
            options=options,
            pattern=req.pattern or None,
            fmt=req.fmt,
            progress=report,
            cancel=report.cancelled,
            save_fn=host.save_fn,
        )
    finally:
        for undo in reversed(undos):
            undo()
    total = sum(len(b) for b in batches)
    lines.insert(0, ("ok", f"decoded and saved {len(job.saved)}/{total} image(s)"))
    for path, rep in job.failures:
        if rep.status.value == "failed":
            lines.append(("error", f"{Path(path).name}: sample {rep.index} failed: {rep.message}"))
    lines += [("error", e) for e in job.save_errors]
    if job.cancelled:
        lines.append(("warn", f"interrupted: {total - len(job.saved)} sample(s) not decoded"))
    for f in job.files:
        for r in f.result.reports:
            if r.status.value == "recovered":
                lines.append(("warn", f"{Path(f.batch.path).name} #{r.index}: recovered in {r.dtype}"))
    images = [(str(s.path), f"{s.path.name}") for s in job.saved]
    infotexts = [s.infotext for s in job.saved]
    ok = job.ok and not errors
    return DecodeOutcome(images, infotexts, _log_html(lines), ok, job.cancelled)
