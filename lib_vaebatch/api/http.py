"""What the JSON routes (:mod:`.routes`) and the remote-VAE endpoints (:mod:`.remote`) share: the
configuration, the prefix, HTTP Basic auth, the size-limited body read and the JSON error answers.
Both import it and neither imports the other; :mod:`.mount` puts them under one router."""

from __future__ import annotations

import base64
import binascii
import inspect
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBasic
from pydantic import BaseModel

from lib_vaebatch.api.service import ApiError
from lib_vaebatch.host import Host, Reporter

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


class ErrorResponse(BaseModel):
    error: str
    detail: Any = None


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


def error_response(exc: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Basic"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def respond(name: str, work: Callable[[], Awaitable[Response]]) -> Response:
    """``work()``'s response; an :class:`ApiError` as its JSON error, and any other exception (a
    bug) as a JSON 500, logged with its traceback: the clients call ``response.json()``."""
    try:
        return await work()
    except ApiError as exc:
        return error_response(exc)
    except Exception as exc:
        log.exception("%s failed", name)
        return JSONResponse({"error": f"{name} failed", "detail": str(exc)}, status_code=500)


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
