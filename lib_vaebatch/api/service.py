"""The HTTP API's work, free of any web framework: validate a JSON payload, run the engine through
a :class:`~lib_vaebatch.host.Host`, and build the JSON answer.

Every problem with the request raises :class:`ApiError` (a 4xx with ``error`` and ``detail``)
before any work starts; problems while decoding are reported per sample, never as a failed
request, and never lose the other samples."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import math
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from lib_vaebatch import __version__
from lib_vaebatch.engine.decode import InputError, check_latents
from lib_vaebatch.engine.encode import EncodeOptions, encode_images, prepare_images
from lib_vaebatch.engine.options import EngineOptions
from lib_vaebatch.families import FAMILY_NAMES, get_family
from lib_vaebatch.host import Host, Reporter, UserError, checked_engine_options
from lib_vaebatch.images import ImageInputError, parse_color, tensor_to_image
from lib_vaebatch.latents import MAX_LATENT_ELEMENTS, LatentBatch, LatentFileError, read_latents
from lib_vaebatch.saving import encode_image

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
MAX_IMAGES = 256


class ApiError(Exception):
    """A bad request: HTTP ``status`` with ``{"error": error, "detail": detail}``."""

    def __init__(self, error: str, detail: Any = None, status: int = 400) -> None:
        super().__init__(error)
        self.error, self.detail, self.status = error, detail, status

    def body(self) -> dict[str, Any]:
        return {"error": self.error, "detail": self.detail}


# -- payload checks ---------------------------------------------------------------------------
def _field(payload: Mapping[str, Any], name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    value = payload.get(name, default)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float)):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ApiError(f"'{name}' must be {want}", {"field": name, "got": type(value).__name__}, 422)
    return value


def _object(payload: Any) -> Mapping[str, Any]:
    if not isinstance(payload, dict):
        raise ApiError("the request body must be a JSON object", {"got": type(payload).__name__}, 422)
    return payload


def _b64(text: str, name: str) -> bytes:
    if text.startswith("data:"):  # a data URL: the base64 after the comma
        _, comma, text = text.partition(",")
        if not comma:
            raise ApiError(f"'{name}' is a data URL without data", {"field": name}, 422)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(f"'{name}' is not valid base64", {"field": name}, 422) from None


def engine_options(payload: Mapping[str, Any]) -> EngineOptions:
    values = dict(_field(payload, "options", dict, {}))
    try:
        return checked_engine_options(values)
    except ValueError as exc:
        raise ApiError("bad engine options", str(exc), 422) from None


def _unknown_keys(payload: Mapping[str, Any], known: set[str]) -> None:
    extra = sorted(set(payload) - known)
    if extra:
        raise ApiError(f"unknown field(s): {', '.join(extra)}", {"known": sorted(known)}, 422)


def tensor_from_bytes(data: bytes, shape: Any, dtype: str) -> torch.Tensor:
    """Raw little-endian C-order bytes to a tensor, every size checked before allocating."""
    if dtype not in DTYPES:
        raise ApiError(f"dtype must be one of {', '.join(DTYPES)}", {"got": dtype}, 422)
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) for n in shape):
        raise ApiError("'shape' must be a list of integers", {"got": shape}, 422)
    if len(shape) != 4 or any(n <= 0 for n in shape):
        raise ApiError("'shape' must be [batch, channels, height, width], all positive", {"got": shape}, 422)
    numel = math.prod(shape)
    if numel > MAX_LATENT_ELEMENTS:
        raise ApiError("'shape' is too large to be latents", {"got": shape}, 413)
    itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
    if len(data) != numel * itemsize:
        raise ApiError(
            "the tensor bytes do not match shape and dtype",
            {"bytes": len(data), "expected": numel * itemsize},
            422,
        )
    t = torch.frombuffer(bytearray(data), dtype=DTYPES[dtype]).reshape(shape)
    return t.float()


def latents_from_file_bytes(data: bytes) -> LatentBatch:
    """Our latents file or a ComfyUI ``.latent`` (both safetensors), read with the file reader's
    checks from a private temporary file."""
    with tempfile.TemporaryDirectory(prefix="vaebatch-api-") as tmp:
        path = Path(tmp) / "request.safetensors"
        path.write_bytes(data)
        try:
            batch = read_latents(path)
        except LatentFileError as exc:
            raise ApiError("unusable latents file", str(exc).replace(str(path), "latents"), 422) from None
    batch.path = None
    return batch


# -- decode -----------------------------------------------------------------------------------
DECODE_FIELDS = {
    "latents",
    "tensor",
    "shape",
    "dtype",
    "scaled",
    "family",
    "options",
    "save",
    "vae",
    "format",
}


def parse_decode(payload: Any) -> tuple[LatentBatch, EngineOptions, bool, str, str]:
    payload = _object(payload)
    _unknown_keys(payload, DECODE_FIELDS)
    options = engine_options(payload)
    save = _field(payload, "save", bool, False)
    vae = _field(payload, "vae", str, "")
    fmt = _field(payload, "format", str, "png").lower()
    if fmt not in ("png", "jpg", "webp"):
        raise ApiError("'format' must be png, jpg or webp", {"got": fmt}, 422)
    has_file, has_tensor = payload.get("latents") is not None, payload.get("tensor") is not None
    if has_file == has_tensor:
        raise ApiError(
            "send either 'latents' (a latents file) or 'tensor' with 'shape' and 'dtype'", None, 422
        )
    if has_file:
        batch = latents_from_file_bytes(_b64(_field(payload, "latents", str), "latents"))
    else:
        data = _b64(_field(payload, "tensor", str), "tensor")
        t = tensor_from_bytes(data, payload.get("shape"), _field(payload, "dtype", str, "float32"))
        family = _field(payload, "family", str, None)
        if family is not None and family not in FAMILY_NAMES:
            raise ApiError(f"'family' must be one of {', '.join(FAMILY_NAMES)}", {"got": family}, 422)
        batch = LatentBatch(latents=t, scaled=_field(payload, "scaled", bool, True), family=family)
    return batch, options, save, vae, fmt


def decode(host: Host, payload: Any, report: Reporter) -> dict[str, Any]:
    from lib_vaebatch.jobs import decode_batch, decode_infotext

    batch, options, save, vae, fmt = parse_decode(payload)
    try:
        batch.resolve_family()
    except ValueError as exc:  # a channel count no model family has
        raise ApiError("unusable latents", str(exc), 422) from None
    backend = _backend(host, vae, batch.family)
    try:
        check_latents(batch.latents, backend.latent_channels)
    except InputError as exc:
        raise ApiError("unusable latents", str(exc), 422) from None
    if options.tiling == "always" and not backend.supports_tiling("decode"):
        raise ApiError("tiling 'always' is not possible with this VAE", {"vae": backend.display_name}, 422)
    family = batch.resolve_family(backend.family)
    images: list[str] = []
    infotexts: list[str] = []
    saved: list[str] = []
    if save:
        from lib_vaebatch.jobs import decode_to_folder

        job = decode_to_folder(
            [batch],
            host.output_dir() / "images",
            lambda _f: backend,
            options=options,
            fmt=fmt,
            progress=report,
            cancel=report.cancelled,
            keep_images=True,
            save_fn=host.save_fn,
        )
        result = job.files[0].result if job.files else None
        for s in job.saved:
            images.append(_png_b64(s.image, s.infotext))
            infotexts.append(s.infotext)
            saved.append(str(s.path))
        for f in job.failed_saves:
            images.append(_png_b64(f.image, f.infotext))
            infotexts.append(f.infotext)
    else:
        outputs: dict[int, str] = {}

        def keep(i: int, sample: torch.Tensor, rep: Any) -> None:
            outputs[i] = decode_infotext(batch, i, backend, family, rep)
            images.append(_png_b64(tensor_to_image(sample), outputs[i]))
            infotexts.append(outputs[i])

        result = decode_batch(
            backend, batch, family, options=options, progress=report, cancel=report.cancelled, on_sample=keep
        )
    reports = result.reports if result is not None else []
    answer: dict[str, Any] = {
        "images": images,
        "infotexts": infotexts,
        "results": [
            {"index": r.index, "status": r.status.value, "dtype": r.dtype, "message": r.message}
            for r in reports
        ],
    }
    if save:
        answer["saved"] = saved
    return answer


def _png_b64(image: Any, infotext: str | None) -> str:
    return base64.b64encode(encode_image(image, "png", infotext)).decode("ascii")


def _backend(host: Host, vae: str, family_name: str | None) -> Any:
    label = vae or host.default_vae()
    if label not in host.vae_labels():
        raise ApiError(f"unknown VAE {label!r}", {"known": host.vae_labels()}, 422)
    try:
        return host.backend(label, get_family(family_name) if family_name else None)
    except UserError as exc:
        raise ApiError("the VAE cannot be used", str(exc), 422) from None


# -- encode -----------------------------------------------------------------------------------
ENCODE_FIELDS = {"images", "options", "vae", "fit", "alpha", "background", "sample", "seed", "parameters"}


def encode(host: Host, payload: Any, report: Reporter) -> dict[str, Any]:
    payload = _object(payload)
    _unknown_keys(payload, ENCODE_FIELDS)
    raw = _field(payload, "images", list, [])
    if not raw:
        raise ApiError("'images' must be a non-empty list of base64 images", None, 422)
    if len(raw) > MAX_IMAGES:
        raise ApiError(f"at most {MAX_IMAGES} images per request", {"got": len(raw)}, 413)
    if not all(isinstance(x, str) for x in raw):
        raise ApiError("'images' must hold base64 strings", None, 422)
    params = payload.get("parameters")
    if params is not None and (
        not isinstance(params, list) or len(params) != len(raw) or not all(isinstance(p, str) for p in params)
    ):
        raise ApiError("'parameters' must be a list of strings, one per image", None, 422)
    options = engine_options(payload)
    background = _field(payload, "background", str, "#ffffff")
    try:
        parse_color(background)
        eo = EncodeOptions(
            fit=_field(payload, "fit", str, "crop"),
            alpha=_field(payload, "alpha", str, "composite"),
            background=background,
            sample=_field(payload, "sample", bool, False),
            seed=_field(payload, "seed", int, 0),
        )
    except ValueError as exc:
        raise ApiError("bad encode options", str(exc), 422) from None
    images = [_b64(x, f"images[{i}]") for i, x in enumerate(raw)]
    try:
        prepared = prepare_images(images, eo)
    except ImageInputError as exc:
        raise ApiError("unusable image", str(exc), 422) from None
    sizes = sorted({p.size for p in prepared})
    if len(sizes) > 1:
        raise ApiError(
            "all images of one request must have the same size after crop/resize", {"sizes": sizes}, 422
        )
    backend = _backend(host, _field(payload, "vae", str, ""), None)
    result = encode_images(
        backend, prepared, encode_options=eo, options=options, progress=report, cancel=report.cancelled
    )
    group = result.groups[0] if result.groups else None
    latents = group.latents if group is not None else torch.zeros(0)
    batch = LatentBatch(
        latents=latents,
        scaled=True,
        family=backend.family.name,
        scaling_factor=backend.scaling_factor,
        shift_factor=backend.shift_factor,
        sizes=group.original_sizes if group is not None else None,
        vae_name=backend.display_name,
        vae_hash=backend.file_hash,
        parameters=[params[i] for i in group.input_indices] if params and group is not None else None,
    )
    data = st_save({"latents": latents.contiguous()}, metadata=batch.metadata())
    return {
        "latents": base64.b64encode(data).decode("ascii"),
        "shape": list(latents.shape),
        "results": [
            {"index": r.index, "status": r.status.value, "dtype": r.dtype, "message": r.message}
            for r in result.reports
        ],
    }


# -- info -------------------------------------------------------------------------------------
def info(host: Host) -> dict[str, Any]:
    import dataclasses

    fields = []
    for f in dataclasses.fields(EngineOptions):
        if f.name == "extra":
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        fields.append({"name": f.name, "default": list(default) if isinstance(default, tuple) else default})
    label = host.default_vae()
    family = None
    with contextlib.suppress(UserError):
        family = host.backend(label).family.name
    return {
        "version": __version__,
        "vae": label,
        "family": family,
        "vaes": host.vae_labels(),
        "options": fields,
    }


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body or b"null")
    except RecursionError:
        raise ApiError("the request body is not valid JSON", "nested too deeply", 400) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError("the request body is not valid JSON", str(exc), 400) from None


__all__ = ["ApiError", "decode", "encode", "info", "parse_json"]
