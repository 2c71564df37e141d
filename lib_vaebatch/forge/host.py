"""Forge-wide services the shared webui glue asks for: the backend of a model, the model itself
(loaded on demand on Forge 2 and Neo), Forge's main thread, and which settings the variant has."""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from lib_vaebatch.forge.adapters import adapter_for
from lib_vaebatch.forge.backend import ForgeVAE
from lib_vaebatch.forge.detect import ForgeHost, detect_host, is_forge_model

T = TypeVar("T")


def backend_for(model: Any, *, vae: Any = None, name: str | None = None) -> ForgeVAE | None:
    """The engine backend of a model Forge built, or None when this is not one."""
    if not is_forge_model(model):
        return None
    host = detect_host()
    if host is None:
        return None
    return ForgeVAE(model, adapter_for(host), vae=vae, name=name)


def vae_from_file(model: Any, path: str) -> Any:
    host = detect_host()
    assert host is not None
    return adapter_for(host).vae_from_file(model, path)


def loaded_model() -> Any:
    """``shared.sd_model``, loaded first where Forge has not yet (on Forge 2 and Neo it is a
    placeholder without ``forge_objects`` until the first generation)."""
    from modules import shared

    model = shared.sd_model
    if is_forge_model(model):
        return model
    sd_models = importlib.import_module("modules.sd_models")
    reload = getattr(sd_models, "forge_model_reload", None)
    if reload is None:
        return model
    data = getattr(sd_models, "model_data", None)
    params = getattr(data, "forge_loading_parameters", None)
    if not params or params.get("checkpoint_info") is None:
        # Nothing selected yet: let Forge pick the checkpoint the way its UI does at start.
        importlib.import_module("modules_forge.main_entry").refresh_model_loading_parameters()
    out = reload()
    model = out[0] if isinstance(out, tuple) else out
    return model if model is not None else shared.sd_model


def _main_thread_module() -> Any | None:
    try:
        return importlib.import_module("modules_forge.main_thread")
    except ImportError:
        return None


_local = threading.local()


def on_main_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` on Forge's main thread, where generations run and models move (waiting for it),
    and re-raise its exception here; run it directly when already there or not on Forge."""
    mt = _main_thread_module()
    if mt is None or detect_host() is None or getattr(_local, "inside", False):
        return fn(*args)
    box: dict[str, Any] = {}

    def task() -> None:
        _local.inside = True
        try:
            box["result"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - carried back to the caller's thread
            box["error"] = exc
        finally:
            _local.inside = False

    mt.run_and_wait_result(task)
    if "error" in box:
        raise box["error"]
    return box.get("result")  # type: ignore[return-value]


def has_setting(name: str) -> bool:
    """Whether this variant registers ``opts.<name>`` (Neo has no ``auto_vae_precision``)."""
    from modules import shared

    labels = getattr(shared.opts, "data_labels", None)
    return name in labels if isinstance(labels, dict) else hasattr(shared.opts, name)


def current_host() -> ForgeHost | None:
    return detect_host()
