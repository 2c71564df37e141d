"""The JSON routes of ``/vaebatch/v1`` (decode, encode, info) as a FastAPI router, mounted with the
remote-VAE endpoints by :mod:`lib_vaebatch.api.mount`, the same in the webui (on_app_started) and in
the standalone ``serve`` app. Runs on fastapi 0.94/pydantic 1 (A1111) and newer/pydantic 2.

Bodies are read as a stream with a size limit (413 before the whole body is in memory), parsed and
validated by :mod:`lib_vaebatch.api.service`, and every error is JSON ``{"error", "detail"}``
with a 4xx status. The work runs in a worker thread under the host's job lock (the webui's
queue lock and shared.state)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from lib_vaebatch.api import service
from lib_vaebatch.api.http import ERRORS, ApiConfig, check_auth, read_body, respond
from lib_vaebatch.host import Reporter


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


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    fn = getattr(model, "model_json_schema", None) or model.schema
    return fn()


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": model_schema(model)}}}
    }


# -- plumbing ---------------------------------------------------------------------------------
async def handle(
    config: ApiConfig, request: Request, name: str, work: Callable[[Any, Reporter], Any]
) -> Response:
    async def run() -> Response:
        check_auth(request, config.credentials())
        payload = service.parse_json(await read_body(request, config.max_bytes()))
        return JSONResponse(await run_in_threadpool(config.run, name, lambda rep: work(payload, rep)))

    return await respond(name, run)


def make_json_router(config: ApiConfig) -> APIRouter:
    """``POST /decode``, ``POST /encode``, ``GET /info`` (no prefix: :mod:`.mount` adds it)."""
    router = APIRouter()
    host = config.host

    @router.post(
        "/decode",
        response_model=DecodeResponse,
        responses=ERRORS,
        openapi_extra=json_body(DecodeRequest),
        summary="Decode latents into images",
    )
    async def decode(request: Request) -> Response:
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
    async def encode(request: Request) -> Response:
        """Base64 images of one size (after crop/resize) to one latents file (base64 safetensors)."""
        return await handle(config, request, "encode", lambda p, rep: service.encode(host, p, rep))

    @router.get("/info", response_model=InfoResponse, responses=ERRORS, summary="Version, VAE and options")
    async def info(request: Request) -> Response:
        async def run() -> Response:
            check_auth(request, config.credentials())
            return JSONResponse(await run_in_threadpool(service.info, host))

        return await respond("info", run)

    return router
