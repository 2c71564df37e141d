"""The ``/vaebatch/v1`` routes as a FastAPI router, the same in the webui (on_app_started) and in
the standalone ``serve`` app. Runs on fastapi 0.94/pydantic 1 (A1111) and newer/pydantic 2.

Bodies are read as a stream with a size limit (413 before the whole body is in memory), parsed and
validated by :mod:`lib_vaebatch.api.service`, and every error is JSON ``{"error", "detail"}``
with a 4xx status. The work runs in a worker thread under the host's job lock (the webui's
queue lock and shared.state)."""

from __future__ import annotations

import base64
import binascii
import inspect
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from lib_vaebatch.api import service
from lib_vaebatch.api.service import ApiError
from lib_vaebatch.ui.actions import Host, Reporter

log = logging.getLogger("vaebatch")

PREFIX = "/vaebatch/v1"
DEFAULT_MAX_BYTES = 64 << 20

#: (job name, work(reporter) -> result) -> result; runs the work under the host's lock/state.
Runner = Callable[[str, Callable[[Reporter], Any]], Any]


@dataclass
class ApiConfig:
    host: Host
    run: Runner
    max_bytes: Callable[[], int] = lambda: DEFAULT_MAX_BYTES
    #: user -> password; empty: no auth (the webui's --api-auth fills it)
    credentials: Callable[[], dict[str, str]] = dict
    tags: list[str] = field(default_factory=lambda: ["VAE Batch"])


# -- OpenAPI models (documentation of what the handlers accept and return) ---------------------
class DecodeRequest(BaseModel):
    latents: str | None = None
    tensor: str | None = None
    shape: list[int] | None = None
    dtype: str | None = "float32"
    scaled: bool | None = True
    family: str | None = None
    vae: str | None = None
    format: str | None = "png"
    options: dict[str, Any] | None = None
    save: bool | None = False


class SampleResult(BaseModel):
    index: int
    status: str
    dtype: str | None = None
    message: str = ""


class DecodeResponse(BaseModel):
    images: list[str]
    infotexts: list[str]
    results: list[SampleResult]
    saved: list[str] | None = None


class EncodeRequest(BaseModel):
    images: list[str]
    parameters: list[str] | None = None
    vae: str | None = None
    fit: str | None = "crop"
    alpha: str | None = "composite"
    background: str | None = "#ffffff"
    sample: bool | None = False
    seed: int | None = 0
    options: dict[str, Any] | None = None


class EncodeResponse(BaseModel):
    latents: str
    shape: list[int]
    results: list[SampleResult]


class OptionInfo(BaseModel):
    name: str
    default: Any = None


class InfoResponse(BaseModel):
    version: str
    vae: str
    family: str | None = None
    vaes: list[str]
    options: list[OptionInfo]


class ErrorResponse(BaseModel):
    error: str
    detail: Any = None


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    fn = getattr(model, "model_json_schema", None) or model.schema
    return fn()


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": model_schema(model)}}}
    }


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (400, "Malformed request"),
        (401, "Credentials required (--api-auth)"),
        (413, "Request too large"),
        (422, "Invalid request"),
        (503, "Busy or interrupted"),
    )
}


class _DocumentedBasic(HTTPBasic):
    """HTTP Basic in the OpenAPI schema only: FastAPI's own check would answer a malformed header
    in its format before ours; :func:`check_auth` does the checking."""

    async def __call__(self, request: Request) -> None:  # type: ignore[override]
        return None

    # FastAPI reads the parameters of an instance's __call__ without the module's globals, so the
    # postponed annotation above could not be resolved: give it the class itself.
    __call__.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request),
        ]
    )


basic = _DocumentedBasic(scheme_name="HTTPBasic", auto_error=False)


# -- plumbing ---------------------------------------------------------------------------------
def error_response(exc: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Basic"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def check_auth(request: Request, credentials: dict[str, str]) -> None:
    """HTTP Basic against the configured users, as /sdapi does with --api-auth."""
    if not credentials:
        return
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "basic":
        try:
            user, _, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            user, password = "", ""
        expected = credentials.get(user)
        if expected is not None and secrets.compare_digest(password.encode(), expected.encode()):
            return
    raise ApiError("incorrect or missing credentials", None, 401)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise ApiError("request too large", {"limit_bytes": limit, "declared": int(declared)}, 413)
        except ValueError:
            raise ApiError("bad Content-Length header", None, 400) from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError("request too large", {"limit_bytes": limit}, 413)
        chunks.append(chunk)
    return b"".join(chunks)


async def handle(
    config: ApiConfig, request: Request, name: str, work: Callable[[Any, Reporter], Any]
) -> JSONResponse:
    try:
        check_auth(request, config.credentials())
        payload = service.parse_json(await read_body(request, config.max_bytes()))
        result = await run_in_threadpool(config.run, name, lambda rep: work(payload, rep))
    except ApiError as exc:
        return error_response(exc)
    except Exception as exc:  # a bug must answer JSON, logged with its traceback
        log.exception("%s failed", name)
        return JSONResponse({"error": f"{name} failed", "detail": str(exc)}, status_code=500)
    return JSONResponse(result)


def make_router(config: ApiConfig) -> APIRouter:
    router = APIRouter(prefix=PREFIX, tags=config.tags, dependencies=[Depends(basic)])
    host = config.host

    @router.post(
        "/decode",
        response_model=DecodeResponse,
        responses=ERRORS,
        openapi_extra=json_body(DecodeRequest),
        summary="Decode latents into images",
    )
    async def decode(request: Request) -> JSONResponse:
        """A latents file (ours or ComfyUI `.latent`, base64) or a raw tensor with shape and dtype;
        every image comes back as a base64 PNG carrying its infotext, with a result per sample."""
        return await handle(config, request, "decode", lambda p, rep: service.decode(host, p, rep))

    @router.post(
        "/encode",
        response_model=EncodeResponse,
        responses=ERRORS,
        openapi_extra=json_body(EncodeRequest),
        summary="Encode images into a latents file",
    )
    async def encode(request: Request) -> JSONResponse:
        """Base64 images of one size (after crop/resize) to one latents file (base64 safetensors)."""
        return await handle(config, request, "encode", lambda p, rep: service.encode(host, p, rep))

    @router.get("/info", response_model=InfoResponse, responses=ERRORS, summary="Version, VAE and options")
    async def info(request: Request) -> JSONResponse:
        try:
            check_auth(request, config.credentials())
            return JSONResponse(await run_in_threadpool(service.info, host))
        except ApiError as exc:
            return error_response(exc)

    from lib_vaebatch.api.remote import make_remote_router

    router.include_router(make_remote_router(config))
    return router
