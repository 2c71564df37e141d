"""The whole HTTP API as one router for a host to mount (the webui's app at start, or ``serve``):
the JSON routes (:mod:`.routes`) and the remote-VAE endpoints (:mod:`.remote`) under
``/vaebatch/v1``, documented as HTTP Basic (checked by :func:`~lib_vaebatch.api.http.check_auth`)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from lib_vaebatch.api.http import PREFIX, ApiConfig, basic
from lib_vaebatch.api.remote import make_remote_router
from lib_vaebatch.api.routes import make_json_router


def make_router(config: ApiConfig) -> APIRouter:
    router = APIRouter(prefix=PREFIX, tags=config.tags, dependencies=[Depends(basic)])
    router.include_router(make_json_router(config))
    router.include_router(make_remote_router(config))
    return router


__all__ = ["make_router"]
