"""script_callbacks (reference §3): registrars, clear on reload, unloaded callbacks in reverse."""

from __future__ import annotations

from collections import namedtuple

ScriptCallback = namedtuple("ScriptCallback", ["script", "callback", "name"])
callback_map: dict[str, list[ScriptCallback]] = {
    "callbacks_ui_settings": [],
    "callbacks_before_ui": [],
    "callbacks_script_unloaded": [],
    "callbacks_app_started": [],
    "callbacks_ui_tabs": [],
}


def _add(kind, callback, name=None):
    callback_map[kind].append(ScriptCallback("", callback, name))


def clear_callbacks():
    for v in callback_map.values():
        v.clear()


def remove_callbacks_for_function(callback_func):
    for v in callback_map.values():
        for cb in [cb for cb in v if cb.callback == callback_func]:
            v.remove(cb)


def on_ui_settings(callback, *, name=None):
    _add("callbacks_ui_settings", callback, name)


def on_before_ui(callback, *, name=None):
    _add("callbacks_before_ui", callback, name)


def on_script_unloaded(callback, *, name=None):
    _add("callbacks_script_unloaded", callback, name)


def on_app_started(callback, *, name=None):
    _add("callbacks_app_started", callback, name)


def on_ui_tabs(callback, *, name=None):
    _add("callbacks_ui_tabs", callback, name)


def _run(kind, *args, reverse=False):
    cbs = list(callback_map[kind])
    for cb in reversed(cbs) if reverse else cbs:
        try:
            cb.callback(*args)
        except Exception as exc:  # reported, never raised (§3)
            report_log.append(f"{kind}: {type(exc).__name__}: {exc}")


report_log: list[str] = []


def ui_settings_callback():
    _run("callbacks_ui_settings")


def before_ui_callback():
    _run("callbacks_before_ui", reverse=True)


def script_unloaded_callback():
    _run("callbacks_script_unloaded", reverse=True)


def ui_tabs_callback():
    """Each callback returns None or a list of (blocks, title, elem_id) tuples (§3 on_ui_tabs)."""
    res = []
    for cb in callback_map["callbacks_ui_tabs"]:
        res += cb.callback() or []
    return res


def app_started_callback(demo, app):
    _run("callbacks_app_started", demo, app)
