"""The ``/vaebatch/v1`` routes inside the webui (on_app_started): its VAE list and saving (the
tab's host), --api-auth credentials (extension routes get no auth from the webui itself, reference
§5.1), the queue lock and shared.state (so /sdapi/v1/progress shows the job and /sdapi/v1/interrupt
stops it), and a size limit from Settings."""

from __future__ import annotations

from typing import Any

from lib_vaebatch.forge import host as forge
from lib_vaebatch.host import Reporter

MAX_MB_KEY = "vaebatch_api_max_mb"
DEFAULT_MAX_MB = 64


def credentials() -> dict[str, str]:
    from modules import shared

    out: dict[str, str] = {}
    for pair in (getattr(shared.cmd_opts, "api_auth", None) or "").split(","):
        user, sep, password = pair.strip().partition(":")
        if sep and user:
            out[user] = password
    return out


def max_bytes() -> int:
    from modules import shared

    try:
        mb = float(shared.opts.data.get(MAX_MB_KEY, DEFAULT_MAX_MB))
    except (TypeError, ValueError):
        mb = DEFAULT_MAX_MB
    return int(max(1.0, mb) * (1 << 20))


def run(name: str, work: Any) -> Any:
    from modules import call_queue, shared

    with call_queue.queue_lock:
        state = shared.state
        state.begin(job=f"vaebatch_{name}")
        try:

            def progress(done: int, total: int, text: str) -> None:
                state.job_count = total
                state.job_no = done
                state.textinfo = f"VAE Batch: {name} {done}/{total}"

            reporter = Reporter(progress=progress, cancel=lambda: bool(state.interrupted))
            return forge.on_main_thread(work, reporter)  # Forge: on its main thread
        finally:
            state.end()


def on_app_started(_demo: Any, app: Any) -> None:
    from lib_vaebatch.api.http import PREFIX, ApiConfig
    from lib_vaebatch.api.mount import make_router
    from lib_vaebatch.webui.tab import WebuiHost

    if any(getattr(r, "path", "").startswith(PREFIX) for r in app.routes):
        return  # already there (the callback runs again after Reload UI on the same app)
    config = ApiConfig(host=WebuiHost(), run=run, max_bytes=max_bytes, credentials=credentials)
    app.include_router(make_router(config))
