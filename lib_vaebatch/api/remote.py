"""Remote-VAE endpoints that speak diffusers' Hybrid Inference protocol, so that the unmodified
``diffusers.utils.remote_utils.remote_decode`` / ``remote_encode`` (diffusers >= 0.33) can be
pointed at ``/vaebatch/v1/remote/decode`` and ``/vaebatch/v1/remote/encode``.

The client is the specification (docs/domain-reference.md §4): the body is a raw little-endian
C-order tensor (or, for encode, PNG bytes) described by query parameters (``shape`` repeated once
per dimension, ``dtype``, ``scaling_factor``, ``shift_factor``, ``do_scaling``, ``output_type``,
``image_format``, ``partial_postprocess``, ``height``/``width`` for packed Flux latents). The body
type is decided from the parameters and magic bytes, never from Content-Type (``remote_encode``
sends none). Tensor answers carry ``shape`` (JSON) and ``dtype`` headers; every error is JSON
``{"error", "detail"}`` with a 4xx/5xx status, which the client raises as ``RuntimeError``.

Extensions beyond the protocol: ``vae`` picks a VAE by its label (default: the host's default),
and ``GET`` on either path answers a small JSON description (health check, family, constants).
Decodes run through the engine (:func:`~lib_vaebatch.engine.decode.decode_latents`) under the
host's job lock, so the NaN check and precision ladder apply; a sample that stays non-finite is a
422 naming it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from lib_vaebatch.api import service
from lib_vaebatch.api.http import ERRORS, ApiConfig, check_auth, read_body, respond
from lib_vaebatch.api.service import ApiError
from lib_vaebatch.backends.base import VAEBackend
from lib_vaebatch.engine.decode import InputError, check_latents, decode_latents
from lib_vaebatch.engine.encode import encode_pixels
from lib_vaebatch.engine.results import BatchResult
from lib_vaebatch.families import default_family_for_channels, no_family_problem, to_raw
from lib_vaebatch.host import Host, Reporter
from lib_vaebatch.images import ImageInputError, prepare_image, tensor_to_image
from lib_vaebatch.latents import MAX_LATENT_ELEMENTS
from lib_vaebatch.saving import encode_image

DECODE_PATH = "/remote/decode"
ENCODE_PATH = "/remote/encode"
TENSOR_MEDIA = "tensor/binary"
WIRE_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "uint8": torch.uint8,
}
OUTPUT_TYPES = ("pil", "pt")
IMAGE_FORMATS = {"jpg": "jpg", "jpeg": "jpg", "png": "png"}
IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"RIFF")
JPEG_QUALITY = 95

Query = Mapping[str, Sequence[str]]


# -- query parameters --------------------------------------------------------------------------
def _one(query: Query, name: str) -> str | None:
    values = query.get(name) or []
    return values[-1] if values else None


def _bool(query: Query, name: str, default: bool) -> bool:
    text = _one(query, name)
    if text is None or text == "":
        return default
    low = text.strip().lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off", "none"):
        return False
    raise ApiError(f"'{name}' must be True or False", {"got": text}, 422)


def _float(query: Query, name: str) -> float | None:
    text = _one(query, name)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ApiError(f"'{name}' must be a number", {"got": text}, 422) from None
    if not math.isfinite(value):
        raise ApiError(f"'{name}' must be finite", {"got": text}, 422)
    return value


def _int(query: Query, name: str) -> int | None:
    text = _one(query, name)
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise ApiError(f"'{name}' must be an integer", {"got": text}, 422) from None
    if value <= 0:
        raise ApiError(f"'{name}' must be positive", {"got": value}, 422)
    return value


def _shape(query: Query) -> list[int] | None:
    """``shape=1&shape=4&...`` as ``requests`` sends a list; ``[1, 4, ...]`` and ``1,4,...`` too."""
    values = list(query.get("shape") or [])
    if not values:
        return None
    if len(values) == 1:
        text = values[0].strip()
        values = (
            [v for v in text.strip("[]()").split(",") if v.strip()]
            if text[:1] in "[(" or "," in text
            else values
        )
    try:
        shape = [int(v) for v in values]
    except ValueError:
        raise ApiError(
            "'shape' must be integers, one 'shape' parameter per dimension", {"got": values}, 422
        ) from None
    if not shape or any(n <= 0 for n in shape):
        raise ApiError("'shape' must hold positive sizes", {"got": shape}, 422)
    return shape


def tensor_from_wire(data: bytes, shape: list[int], dtype: str, allowed: Sequence[str]) -> torch.Tensor:
    """Raw little-endian C-order bytes to a tensor of ``shape`` (sizes checked before allocating)."""
    if dtype not in allowed:
        raise ApiError(f"'dtype' must be one of {', '.join(allowed)}", {"got": dtype}, 422)
    numel = math.prod(shape)
    if numel > MAX_LATENT_ELEMENTS:
        raise ApiError("'shape' is too large", {"got": shape}, 413)
    torch_dtype = WIRE_DTYPES[dtype]
    expected = numel * torch.empty((), dtype=torch_dtype).element_size()
    if len(data) != expected:
        raise ApiError(
            "the body does not match 'shape' and 'dtype'",
            {"bytes": len(data), "expected": expected, "shape": shape, "dtype": dtype},
            422,
        )
    return torch.frombuffer(bytearray(data), dtype=torch_dtype).reshape(shape)


def tensor_to_wire(t: torch.Tensor) -> tuple[bytes, dict[str, str]]:
    """A CPU tensor's raw bytes and the ``shape``/``dtype`` headers the client parses."""
    t = t.detach().cpu().contiguous()
    name = str(t.dtype).split(".")[-1]
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: send its bits
        data = t.view(torch.int16).numpy().tobytes()
    else:
        data = t.numpy().tobytes()
    return data, {"shape": json.dumps(list(t.shape)), "dtype": name}


def unpack_latents(latents: torch.Tensor, height: int, width: int, downscale: int) -> torch.Tensor:
    """Packed Flux latents ``[B, (h/2)*(w/2), C*4]`` to ``[B, C, h, w]`` for an image of
    ``height`` x ``width`` pixels (diffusers' ``FluxPipeline._unpack_latents``)."""
    b, seq, packed = latents.shape
    h = 2 * (int(height) // (downscale * 2))
    w = 2 * (int(width) // (downscale * 2))
    if h == 0 or w == 0 or packed % 4 or seq != (h // 2) * (w // 2):
        raise ApiError(
            "packed latents do not match 'height' and 'width'",
            {
                "shape": [b, seq, packed],
                "height": height,
                "width": width,
                "expected_seq": (h // 2) * (w // 2),
            },
            422,
        )
    x = latents.view(b, h // 2, w // 2, packed // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, packed // 4, h, w)


# -- the work (framework-free; runs in a worker thread under the host's job lock) -----------------
@dataclass
class Answer:
    body: bytes
    media_type: str
    headers: dict[str, str]


def _pick_backend(host: Host, vae: str, channels: int | None) -> VAEBackend:
    backend = service._backend(host, vae, None)
    if channels is not None and backend.preview and backend.latent_channels != channels:
        try:  # the built-in VAE follows the latents (4 channels: SD, 16: Flux)
            family = default_family_for_channels(channels)
        except ValueError:
            raise ApiError("unusable latents", no_family_problem(channels), 422) from None
        backend = service._backend(host, vae, family.name)
    return backend


def _raise_failures(result: BatchResult, op: str) -> None:
    if result.cancelled:
        raise ApiError(f"{op} interrupted", None, 503)
    failed = result.failed
    if not failed:
        return
    detail = [{"index": r.index, "message": r.message} for r in failed]
    first = failed[0]
    if first.message.startswith("non-finite"):
        raise ApiError(f"sample {first.index}: {op} gave NaN/Inf ({first.message})", detail, 422)
    raise ApiError(f"sample {first.index}: {op} failed ({first.message})", detail, 500)


def decode_work(host: Host, query: Query, body: bytes, report: Reporter) -> Answer:
    output_type = (_one(query, "output_type") or "pil").lower()
    if output_type == "mp4":
        raise ApiError("output_type mp4 is not supported (image VAEs only); use pil or pt", None, 400)
    if output_type not in OUTPUT_TYPES:
        raise ApiError("'output_type' must be pil or pt", {"got": output_type}, 422)
    fmt_text = (_one(query, "image_format") or "jpg").lower()
    if fmt_text not in IMAGE_FORMATS:
        raise ApiError("'image_format' must be jpg or png", {"got": fmt_text}, 422)
    partial = _bool(query, "partial_postprocess", False)
    shape = _shape(query)
    dtype = _one(query, "dtype")
    if shape is None or dtype is None:
        raise ApiError("'shape' and 'dtype' query parameters are required", None, 422)
    if len(shape) not in (3, 4):
        raise ApiError(
            "'shape' must be [batch, channels, height, width] or packed [batch, tokens, channels]",
            {"got": shape},
            422,
        )
    latents = tensor_from_wire(body, shape, dtype, ("float16", "bfloat16", "float32"))
    height, width = _int(query, "height"), _int(query, "width")
    scaling, shift = _float(query, "scaling_factor"), _float(query, "shift_factor")
    do_scaling = _bool(query, "do_scaling", False)
    if scaling == 0.0:
        raise ApiError("'scaling_factor' must not be 0", None, 422)
    vae = _one(query, "vae") or ""

    channels = latents.shape[2] // 4 if latents.ndim == 3 else latents.shape[1]
    backend = _pick_backend(host, vae, channels)
    if latents.ndim == 3:
        if height is None or width is None:
            raise ApiError("packed latents [batch, tokens, channels] need 'height' and 'width'", None, 422)
        latents = unpack_latents(latents, height, width, backend.downscale)
    latents = latents.float()
    if output_type == "pil":
        latents = latents[:1]  # the client can read only one encoded image
    try:
        check_latents(latents, backend.latent_channels)
    except InputError as exc:
        raise ApiError("unusable latents", str(exc), 422) from None

    # diffusers: given factors mean "un-scale with these" (a missing one: 1 / 0); do_scaling
    # without a scaling_factor (deprecated) means "with the VAE's own"; nothing means raw latents.
    scaled = scaling is not None or shift is not None or do_scaling
    if scaling is not None or not do_scaling:
        scale_arg, shift_arg = scaling or 1.0, shift or 0.0
    else:
        scale_arg, shift_arg = None, shift  # None: the backend's constants
    result = decode_latents(
        backend,
        latents,
        scaled=scaled,
        scaling_factor=scale_arg,
        shift_factor=shift_arg,
        progress=report,
        cancel=report.cancelled,
    )
    _raise_failures(result, "decode")
    images = torch.stack([o for o in result.outputs if o is not None]).float()
    if output_type == "pil":
        fmt = IMAGE_FORMATS[fmt_text]
        data = encode_image(tensor_to_image(images[0]), fmt, None, quality=JPEG_QUALITY)
        return Answer(data, "image/png" if fmt == "png" else "image/jpeg", {})
    if partial:  # uint8 NHWC, as VaeImageProcessor's postprocess would give before PIL
        pixels = ((images.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
        data, headers = tensor_to_wire(pixels)
    else:  # float16 NCHW in [-1, 1], not denormalised
        data, headers = tensor_to_wire(images.to(torch.float16))
    return Answer(data, TENSOR_MEDIA, headers)


def _pixels_from_body(query: Query, body: bytes) -> torch.Tensor:
    """``[B, 3, H, W]`` as uint8 [0, 255] or float [-1, 1]."""
    shape, dtype = _shape(query), _one(query, "dtype")
    if shape is not None or dtype is not None:
        if shape is None or dtype is None:
            raise ApiError("a tensor body needs both 'shape' and 'dtype'", None, 422)
        if len(shape) == 3:
            shape = [1, *shape]
        if len(shape) != 4 or shape[1] != 3:
            raise ApiError("'shape' must be [batch, 3, height, width] (RGB)", {"got": shape}, 422)
        pixels = tensor_from_wire(body, shape, dtype, tuple(WIRE_DTYPES))
        if pixels.dtype == torch.uint8:
            return pixels
        pixels = pixels.float()
        if not bool(torch.isfinite(pixels).all()):
            raise ApiError("the image tensor contains NaN or Inf", None, 422)
        # diffusers' VaeImageProcessor convention: [0, 1], or [-1, 1] when anything is negative
        return pixels if bool((pixels < 0).any()) else pixels * 2.0 - 1.0
    if not body.startswith(IMAGE_MAGIC):
        raise ApiError(
            "the body is neither an image (PNG/JPEG/WebP...) nor a tensor described by 'shape' and 'dtype'",
            {"bytes": len(body)},
            422,
        )
    try:
        prepared = prepare_image(body, name="<body>")
    except ImageInputError as exc:
        raise ApiError("unusable image", str(exc), 422) from None
    return prepared.pixels.unsqueeze(0)


def encode_work(host: Host, query: Query, body: bytes, report: Reporter) -> Answer:
    scaling, shift = _float(query, "scaling_factor"), _float(query, "shift_factor")
    pixels = _pixels_from_body(query, body)
    backend = _pick_backend(host, _one(query, "vae") or "", None)
    h, w = pixels.shape[-2:]
    if h % backend.downscale or w % backend.downscale:
        raise ApiError(f"image size {w}x{h} is not a multiple of {backend.downscale}", None, 422)
    result = encode_pixels(backend, pixels, progress=report, cancel=report.cancelled)
    _raise_failures(result, "encode")
    latents = torch.stack([o for o in result.outputs if o is not None]).float()
    # The engine scales with the VAE's constants; the protocol's are the request's (none: raw).
    raw = to_raw(latents, backend.scaling_factor, backend.shift_factor)
    if shift is not None:
        raw = raw - shift
    if scaling is not None:
        raw = raw * scaling
    data, headers = tensor_to_wire(raw)
    return Answer(data, TENSOR_MEDIA, headers)


def describe(host: Host, query: Query, op: str) -> dict[str, Any]:
    label = _one(query, "vae") or host.default_vae()
    backend = _pick_backend(host, label, None)
    return {
        "status": "ok",
        "protocol": "diffusers Hybrid Inference (remote_decode/remote_encode)",
        "op": op,
        "vae": label,
        "vaes": host.vae_labels(),
        "family": backend.family.name,
        "latent_channels": backend.latent_channels,
        "scaling_factor": backend.scaling_factor,
        "shift_factor": backend.shift_factor,
        "downscale": backend.downscale,
        "preview": backend.preview,
        "output_types": ["pil", "pt"] if op == "decode" else ["pt"],
        "image_formats": ["jpg", "png"] if op == "decode" else [],
    }


# -- OpenAPI (the handlers read the raw request, so the schema is spelled out here) -------------
_BINARY = {"schema": {"type": "string", "format": "binary"}}


def _param(name: str, schema: dict[str, Any], description: str, required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema, "description": description}


_COMMON = [
    _param(
        "scaling_factor",
        {"type": "number"},
        "scale used by the latents: decode divides by it, encode multiplies",
    ),
    _param(
        "shift_factor",
        {"type": "number"},
        "shift: decode adds it after un-scaling, encode subtracts it first",
    ),
    _param("vae", {"type": "string"}, "VAE label (extension; default: the server's default VAE)"),
]
_SHAPE = _param(
    "shape",
    {"type": "array", "items": {"type": "integer"}},
    "tensor shape, one 'shape' parameter per dimension (shape=1&shape=4&shape=64&shape=64)",
)
DECODE_OPENAPI: dict[str, Any] = {
    "parameters": [
        {**_SHAPE, "required": True},
        _param("dtype", {"type": "string", "enum": ["float16", "bfloat16", "float32"]}, "tensor dtype", True),
        *_COMMON,
        _param("do_scaling", {"type": "boolean"}, "deprecated: un-scale with the VAE's own constants"),
        _param(
            "output_type",
            {"type": "string", "enum": ["pil", "pt"], "default": "pil"},
            "pil: image bytes; pt: tensor",
        ),
        _param(
            "image_format",
            {"type": "string", "enum": ["jpg", "png"], "default": "jpg"},
            "with output_type=pil",
        ),
        _param(
            "partial_postprocess",
            {"type": "boolean", "default": False},
            "with output_type=pt: True gives uint8 NHWC, False float16 NCHW in [-1, 1]",
        ),
        _param(
            "height", {"type": "integer"}, "image height in pixels, for packed Flux latents [B, tokens, 64]"
        ),
        _param("width", {"type": "integer"}, "image width in pixels, for packed Flux latents"),
    ],
    "requestBody": {
        "required": True,
        "description": "raw little-endian C-order latents as described by shape and dtype",
        "content": {TENSOR_MEDIA: _BINARY, "application/octet-stream": _BINARY},
    },
}
ENCODE_OPENAPI: dict[str, Any] = {
    "parameters": [
        {**_SHAPE, "description": "for a tensor body: its shape, [B, 3, H, W]"},
        _param(
            "dtype",
            {"type": "string", "enum": list(WIRE_DTYPES)},
            "for a tensor body: uint8 in [0, 255], float in [0, 1] (or [-1, 1] when negative values occur)",
        ),
        *_COMMON,
    ],
    "requestBody": {
        "required": True,
        "description": "an image file (PNG, JPEG...; cropped to a multiple of 8) or a raw tensor",
        "content": {"image/png": _BINARY, TENSOR_MEDIA: _BINARY, "application/octet-stream": _BINARY},
    },
}
_TENSOR_HEADERS = {
    "shape": {"description": "JSON list, e.g. [1, 512, 512, 3]", "schema": {"type": "string"}},
    "dtype": {"description": "uint8, float16 or float32", "schema": {"type": "string"}},
}


def _responses(media: dict[str, Any], description: str) -> dict[int | str, dict[str, Any]]:
    return {200: {"description": description, "content": media, "headers": _TENSOR_HEADERS}, **ERRORS}


# -- the router ---------------------------------------------------------------------------------
Work = Callable[[Host, Query, bytes, Reporter], Answer]


def _query(request: Request) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, value in request.query_params.multi_items():
        out.setdefault(key, []).append(value)
    return out


def make_remote_router(config: ApiConfig) -> APIRouter:
    """``POST``/``GET`` ``/remote/decode`` and ``/remote/encode`` (mounted under ``/vaebatch/v1``)
    for an :class:`~lib_vaebatch.api.http.ApiConfig`."""
    router = APIRouter()
    host: Host = config.host

    async def serve(request: Request, name: str, work: Work) -> Response:
        async def run() -> Response:
            check_auth(request, config.credentials())
            body = await read_body(request, config.max_bytes())
            query = _query(request)
            answer = await run_in_threadpool(config.run, name, lambda rep: work(host, query, body, rep))
            return Response(answer.body, media_type=answer.media_type, headers=answer.headers)

        return await respond(name, run)

    async def info(request: Request, op: str) -> Response:
        async def run() -> Response:
            check_auth(request, config.credentials())
            return JSONResponse(await run_in_threadpool(describe, host, _query(request), op))

        return await respond(f"remote-{op}-info", run)

    @router.post(
        DECODE_PATH,
        response_class=Response,
        responses=_responses(
            {"image/jpeg": _BINARY, "image/png": _BINARY, TENSOR_MEDIA: _BINARY},
            "output_type=pil: the first image as JPEG/PNG; output_type=pt: a raw tensor with "
            "shape/dtype headers",
        ),
        openapi_extra=DECODE_OPENAPI,
        summary="Remote VAE decode (diffusers remote_decode)",
    )
    async def remote_decode(request: Request) -> Response:
        """Point ``diffusers.utils.remote_utils.remote_decode(endpoint=...)`` here."""
        return await serve(request, "remote-decode", decode_work)

    @router.post(
        ENCODE_PATH,
        response_class=Response,
        responses=_responses({TENSOR_MEDIA: _BINARY}, "latents [B, C, H/8, W/8] with shape/dtype headers"),
        openapi_extra=ENCODE_OPENAPI,
        summary="Remote VAE encode (diffusers remote_encode)",
    )
    async def remote_encode(request: Request) -> Response:
        """Point ``diffusers.utils.remote_utils.remote_encode(endpoint=...)`` here; the posterior
        mean, in raw VAE space unless ``scaling_factor``/``shift_factor`` are given."""
        return await serve(request, "remote-encode", encode_work)

    @router.get(DECODE_PATH, summary="Remote VAE decode: health and VAE info")
    async def remote_decode_info(request: Request) -> Response:
        return await info(request, "decode")

    @router.get(ENCODE_PATH, summary="Remote VAE encode: health and VAE info")
    async def remote_encode_info(request: Request) -> Response:
        return await info(request, "encode")

    return router


__all__ = ["decode_work", "encode_work", "make_remote_router", "unpack_latents"]
