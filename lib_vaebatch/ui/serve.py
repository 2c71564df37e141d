"""``python -m lib_vaebatch serve``: the "Latent Batch" UI on its own (FastAPI + gradio, uvicorn)."""

from __future__ import annotations

import inspect
import logging
from typing import Any

import gradio as gr

from lib_vaebatch.ui.app import Action, Wiring, build_ui, error_html
from lib_vaebatch.ui.compat import queue
from lib_vaebatch.ui.standalone import StandaloneHost

log = logging.getLogger("vaebatch")


def standalone_wiring(host: StandaloneHost) -> Wiring:
    def event(kind: str, action: Action, n_outputs: int) -> tuple[Any, None]:
        def handler(_task_id: str, *values: Any, progress: Any = gr.Progress()) -> list[Any]:  # noqa: B008
            def report(done: int, total: int, text: str) -> None:
                progress((done, total), desc=text or kind)

            try:
                return host.run(lambda rep: action(rep, *values), report)
            except Exception as exc:  # a bug must not kill the app: show it, keep serving
                log.exception("%s failed", kind)
                return [None] * (n_outputs - 1) + [error_html(f"{kind} failed: {exc}")]

        return handler, None

    return Wiring(event=event, interrupt=host.interrupt)


def build_app(
    host: StandaloneHost, *, api_auth: str | None = None, max_bytes: int = 64 << 20, ui: bool = True
) -> Any:
    """A FastAPI app: the HTTP API under ``/vaebatch/v1`` (OpenAPI at ``/docs``) and the UI at ``/``.
    ``api_auth``: ``"user:password[,user2:password2]"`` for the API routes (HTTP Basic)."""
    from fastapi import FastAPI

    from lib_vaebatch import __version__
    from lib_vaebatch.api.http import ApiConfig
    from lib_vaebatch.api.mount import make_router

    users = dict(p.split(":", 1) for p in (api_auth or "").split(",") if ":" in p)
    app = FastAPI(title="VAE Batch", version=__version__)
    app.state.vaebatch_host = host
    config = ApiConfig(
        host=host,
        run=lambda _name, work: host.run(work, None),
        max_bytes=lambda: max_bytes,
        credentials=lambda: users,
    )
    app.include_router(make_router(config))
    if not ui:
        return app
    blocks = queue(build_ui(host, standalone_wiring(host)))
    kwargs: dict[str, Any] = {}
    if "allowed_paths" in inspect.signature(gr.mount_gradio_app).parameters:
        kwargs["allowed_paths"] = [str(host.output_dir().resolve())]
    else:  # gradio 3: outputs are copied into its cache; the folder only needs to be readable
        blocks.allowed_paths = [str(host.output_dir().resolve())]
    return gr.mount_gradio_app(app, blocks, path="/", **kwargs)


def serve(host: StandaloneHost, address: str = "127.0.0.1", port: int = 7860, **app_kwargs: Any) -> None:
    import uvicorn

    app = build_app(host, **app_kwargs)
    log.info("Latent Batch on http://%s:%d/ (outputs in %s)", address, port, host.output_dir())
    uvicorn.run(app, host=address, port=port, log_level="warning")
