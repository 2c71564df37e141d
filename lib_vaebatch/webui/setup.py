"""Callback registration, run by ``scripts/vaebatch.py`` each time the webui loads scripts."""

from __future__ import annotations

from lib_vaebatch.webui import api, settings, tab, takeover, xyz


def register() -> None:
    """The webui clears callbacks before each (re)load; removing ours first keeps a second call in
    the same load from doubling them."""
    from modules import script_callbacks

    for fn in (
        settings.on_ui_settings,
        xyz.add_axes,
        takeover.restore_all,
        tab.on_ui_tabs,
        api.on_app_started,
    ):
        script_callbacks.remove_callbacks_for_function(fn)
    script_callbacks.on_ui_settings(settings.on_ui_settings)
    script_callbacks.on_before_ui(xyz.add_axes)
    script_callbacks.on_script_unloaded(takeover.restore_all)
    script_callbacks.on_ui_tabs(tab.on_ui_tabs)
    script_callbacks.on_app_started(api.on_app_started)
