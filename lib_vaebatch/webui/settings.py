"""Settings > "VAE Batch": the defaults of every script option (read when the UI is built, so a
change applies after "Reload UI"), plus settings that are not script options."""

from __future__ import annotations

from typing import Any

from lib_vaebatch.webui import args as A


def option_infos() -> list[tuple[str, Any]]:
    import gradio as gr
    from modules import shared

    out: list[tuple[str, Any]] = []
    for arg in A.ARGS + A.EXTRA_SETTINGS:
        label = "Enabled by default in txt2img and img2img" if arg.name == "enabled" else arg.label
        if arg in A.EXTRA_SETTINGS:
            component, component_args = None, None
        elif arg.kind == "int":
            component, component_args = (
                gr.Slider,
                {"minimum": arg.minimum, "maximum": arg.maximum, "step": arg.step},
            )
        elif arg.kind == "choice":
            component, component_args = gr.Radio, {"choices": list(arg.choices)}
        else:
            component, component_args = None, None
        info = shared.OptionInfo(arg.default, label, component, component_args, section=A.SECTION)
        if arg in A.ARGS:
            info = info.needs_reload_ui()
        out.append((arg.setting_key, info))
    from lib_vaebatch.webui.api import DEFAULT_MAX_MB, MAX_MB_KEY
    from lib_vaebatch.webui.tab import DEFAULT_OUTDIR, OUTDIR_KEY

    out.append(
        (OUTDIR_KEY, shared.OptionInfo(DEFAULT_OUTDIR, "Latent Batch tab: output folder", section=A.SECTION))
    )
    from lib_vaebatch.webui.takeover import REMOTE_URL_KEY

    out.append(
        (
            REMOTE_URL_KEY,
            shared.OptionInfo(
                "",
                "Remote VAE endpoint (Hybrid Inference protocol; for the script's VAE = remote and the tab)",
                section=A.SECTION,
            ),
        )
    )
    out.append(
        (
            MAX_MB_KEY,
            shared.OptionInfo(
                DEFAULT_MAX_MB, "HTTP API (/vaebatch/v1): largest request in MiB", section=A.SECTION
            ),
        )
    )
    return out


def on_ui_settings() -> None:
    from modules import shared

    for key, info in option_infos():
        shared.opts.add_option(key, info)
