"""The "Latent Batch" UI: Encode and Decode tabs, built from the same code in the webui tab and in
the standalone app (gradio 3.41 and 4.40; differences live in :mod:`lib_vaebatch.ui.compat`).

Hosts differ in how an event runs (the webui's queue lock, shared.state progress and task ids;
gradio's own progress bar standalone), in the interrupt, and in extra widgets (Send to img2img),
so :func:`build_ui` takes those as :class:`Wiring`."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gradio as gr

from lib_vaebatch.host import Host, Reporter, UserError
from lib_vaebatch.ui import actions
from lib_vaebatch.ui.actions import DecodeRequest, EncodeRequest
from lib_vaebatch.ui.compat import file_paths, js_kwargs, update, upload_kwargs

LADDERS = {"bf16, fp32": ("bf16", "fp32"), "fp32": ("fp32",), "bf16": ("bf16",), "none": ()}
FORMATS = ["png", "jpg", "webp"]
P = "vaebatch_lb"  # element id prefix

#: fn(reporter, *values) -> outputs; the last output is the result HTML.
Action = Callable[..., list[Any]]


@dataclass
class Wiring:
    #: (kind, action, number of outputs) -> (event handler, JavaScript function name or None).
    #: The handler's first input is a task id (filled in by the JavaScript function, if any).
    event: Callable[[str, Action, int], tuple[Callable[..., Any], str | None]]
    interrupt: Callable[[], None]
    #: Adds host widgets under the decode gallery (gallery, infotext box).
    decode_extras: Callable[[Any, Any], None] | None = None
    #: Extra VAE choices refresh (the webui rescans models/VAE).
    formats: Sequence[str] = tuple(FORMATS)


def error_html(text: str) -> str:
    import html

    return f"<div class='vaebatch-error error'>{html.escape(text)}</div>"


def _encode_action(host: Host) -> Action:
    def run(
        report: Reporter,
        files: Any,
        folder: str,
        vae: str,
        fit: str,
        alpha: str,
        background: str,
        sample: bool,
        seed: float,
        precision: str,
        comfy: bool,
        half: bool,
    ) -> list[Any]:
        req = EncodeRequest(
            uploads=file_paths(files),
            folder=folder,
            vae=vae,
            fit=fit,
            alpha=alpha,
            background=background,
            sample=bool(sample),
            seed=int(seed or 0),
            precision=precision,
            comfy=bool(comfy),
            half=bool(half),
        )
        try:
            out = actions.encode(host, req, report)
        except UserError as exc:
            return [None, None, error_html(str(exc))]
        return [[str(f) for f in out.files] or None, out.previews, out.log_html]

    return run


def decode_options(
    chunk: float, nan_check: bool, ladder: str, tiling: str, tile_mode: str, tile_size: float
) -> dict[str, Any]:
    if ladder not in LADDERS:
        raise UserError(f"unknown recovery ladder {ladder!r}")
    return {
        "max_chunk": int(chunk) or None,
        "nan_check": bool(nan_check),
        "ladder": LADDERS[ladder],
        "tiling": tiling,
        "tile_mode": tile_mode,
        "tile_size": max(8, int(tile_size)) if tile_size else None,
    }


def _decode_action(host: Host) -> Action:
    def run(
        report: Reporter,
        files: Any,
        folder: str,
        vae: str,
        fmt: str,
        pattern: str,
        precision: str,
        chunk: float,
        nan_check: bool,
        ladder: str,
        tiling: str,
        tile_mode: str,
        tile_size: float,
    ) -> list[Any]:
        try:
            req = DecodeRequest(
                uploads=file_paths(files),
                folder=folder,
                vae=vae,
                fmt=fmt,
                pattern=pattern,
                precision=precision,
                options=decode_options(chunk, nan_check, ladder, tiling, tile_mode, tile_size),
            )
            out = actions.decode(host, req, report)
        except UserError as exc:
            return [None, "[]", "", error_html(str(exc))]
        first = out.infotexts[0] if out.infotexts else ""
        return [out.images, json.dumps(out.infotexts), first, out.log_html]

    return run


def _selected_infotext(infotexts: str, evt: gr.SelectData) -> str:
    try:
        return json.loads(infotexts or "[]")[evt.index]
    except (ValueError, IndexError, TypeError):
        return ""


def build_ui(host: Host, wiring: Wiring) -> gr.Blocks:
    labels = host.vae_labels()
    with gr.Blocks(analytics_enabled=False, title="Latent Batch") as blocks:
        with gr.Row(elem_id=f"{P}_vae_row"):
            vae = gr.Dropdown(
                choices=labels,
                value=host.default_vae(),
                label="VAE",
                elem_id=f"{P}_vae",
                info=host.vae_help,
            )
            refresh = gr.Button("\U0001f504", elem_id=f"{P}_vae_refresh", scale=0, min_width=40)
        task_id = gr.Textbox(visible=False, elem_id=f"{P}_task")
        with gr.Tabs(elem_id=f"{P}_tabs"):
            with gr.Tab("Encode", elem_id=f"{P}_encode_tab"):
                with gr.Row():
                    with gr.Column():
                        enc_files = gr.File(
                            label="Images",
                            file_count="multiple",
                            file_types=["image"],
                            elem_id=f"{P}_encode_files",
                            **upload_kwargs(),
                        )
                        enc_dir = gr.Textbox(
                            label="Input folder on the server (optional)",
                            elem_id=f"{P}_encode_dir",
                            visible=not host.hide_dirs,
                        )
                        with gr.Accordion("Encode options", open=False):
                            fit = gr.Radio(
                                ["crop", "resize"],
                                value="crop",
                                label="Size policy",
                                info="Sizes become multiples of 8: crop the edges, or resize",
                                elem_id=f"{P}_fit",
                            )
                            alpha = gr.Radio(
                                ["composite", "drop"],
                                value="composite",
                                label="Transparency",
                                info="Composite onto the background colour, or drop the alpha channel",
                                elem_id=f"{P}_alpha",
                            )
                            background = gr.Textbox(
                                value="#ffffff", label="Background colour", elem_id=f"{P}_background"
                            )
                            sample = gr.Checkbox(
                                value=False,
                                label="Sample the latent distribution (seeded) instead of its mean",
                                elem_id=f"{P}_sample",
                            )
                            seed = gr.Number(value=0, label="Seed", precision=0, elem_id=f"{P}_seed")
                            enc_precision = gr.Dropdown(
                                list(actions.PRECISIONS),
                                value="auto",
                                label="Precision",
                                elem_id=f"{P}_encode_precision",
                            )
                            comfy = gr.Checkbox(
                                value=False, label="Also write a ComfyUI .latent", elem_id=f"{P}_comfy"
                            )
                            half = gr.Checkbox(
                                value=False, label="Store latents as float16", elem_id=f"{P}_half"
                            )
                        with gr.Row():
                            enc_btn = gr.Button("Encode", variant="primary", elem_id=f"{P}_encode_run")
                            enc_stop = gr.Button("Interrupt", variant="stop", elem_id=f"{P}_encode_stop")
                    with gr.Column():
                        gr.HTML(elem_id=f"{P}_encode_progress")
                        enc_out = gr.File(
                            label="Latents files",
                            file_count="multiple",
                            interactive=False,
                            elem_id=f"{P}_encode_output",
                        )
                        enc_gallery = gr.Gallery(
                            label="Encoded images", columns=4, height=320, elem_id=f"{P}_encode_gallery"
                        )
                        enc_log = gr.HTML(elem_id=f"{P}_encode_log")
            with gr.Tab("Decode", elem_id=f"{P}_decode_tab"):
                with gr.Row():
                    with gr.Column():
                        dec_files = gr.File(
                            label="Latent files (.safetensors, ComfyUI .latent, .npy, .pt)",
                            file_count="multiple",
                            file_types=list(actions.DECODE_SUFFIXES),
                            elem_id=f"{P}_decode_files",
                            **upload_kwargs(),
                        )
                        dec_dir = gr.Textbox(
                            label="Input folder on the server (optional)",
                            elem_id=f"{P}_decode_dir",
                            visible=not host.hide_dirs,
                        )
                        with gr.Row():
                            fmt = gr.Dropdown(
                                list(wiring.formats), value="png", label="Format", elem_id=f"{P}_format"
                            )
                            pattern = gr.Textbox(
                                label="File name pattern",
                                placeholder="[seed]-[prompt_spaces]",
                                info="Webui tokens; empty: the default",
                                elem_id=f"{P}_pattern",
                                visible=host.save_fn is None,
                            )
                        with gr.Accordion("Engine options", open=False):
                            dec_precision = gr.Dropdown(
                                list(actions.PRECISIONS),
                                value="auto",
                                label="Precision",
                                elem_id=f"{P}_decode_precision",
                            )
                            chunk = gr.Slider(
                                0,
                                64,
                                value=0,
                                step=1,
                                label="Chunk limit (0 = auto)",
                                info="Most samples decoded at once; auto sizes chunks from free memory",
                                elem_id=f"{P}_chunk",
                            )
                            nan_check = gr.Checkbox(
                                value=True, label="Check every image for NaN/Inf", elem_id=f"{P}_nan_check"
                            )
                            ladder = gr.Dropdown(
                                list(LADDERS),
                                value="bf16, fp32",
                                label="Recovery ladder",
                                info="Precisions a failed image is decoded again in (only that image)",
                                elem_id=f"{P}_ladder",
                            )
                            tiling = gr.Radio(
                                ["auto", "always", "never"],
                                value="auto",
                                label="Tiling",
                                info="auto: only when an image does not fit in memory",
                                elem_id=f"{P}_tiling",
                            )
                            tile_mode = gr.Radio(
                                ["exact", "exact-lean", "fast", "auto", "plain"],
                                value="exact",
                                label="Tile mode",
                                info="exact: same output as untiled; fast: less memory; auto: exact "
                                "where it fits, else fast; plain: independent tiles (not exact)",
                                elem_id=f"{P}_tile_mode",
                            )
                            tile_size = gr.Slider(
                                0,
                                256,
                                value=0,
                                step=8,
                                label="Tile size in latent pixels (0 = auto)",
                                elem_id=f"{P}_tile_size",
                            )
                        with gr.Row():
                            dec_btn = gr.Button("Decode", variant="primary", elem_id=f"{P}_decode_run")
                            dec_stop = gr.Button("Interrupt", variant="stop", elem_id=f"{P}_decode_stop")
                    with gr.Column():
                        gr.HTML(elem_id=f"{P}_decode_progress")
                        dec_gallery = gr.Gallery(
                            label="Decoded images", columns=4, height=420, elem_id=f"{P}_decode_gallery"
                        )
                        infotexts = gr.Textbox(visible=False, value="[]", elem_id=f"{P}_infotexts")
                        info = gr.Textbox(
                            label="Generation info", lines=4, interactive=False, elem_id=f"{P}_info"
                        )
                        if wiring.decode_extras is not None:
                            wiring.decode_extras(dec_gallery, info)
                        dec_log = gr.HTML(elem_id=f"{P}_decode_log")

        def refresh_vaes(current: str) -> Any:
            choices = host.refresh_vaes()
            return update(choices=choices, value=current if current in choices else host.default_vae())

        refresh.click(refresh_vaes, inputs=[vae], outputs=[vae], queue=False)

        enc_outputs = [enc_out, enc_gallery, enc_log]
        handler, js = wiring.event("encode", _encode_action(host), len(enc_outputs))
        enc_btn.click(
            handler,
            inputs=[
                task_id,
                enc_files,
                enc_dir,
                vae,
                fit,
                alpha,
                background,
                sample,
                seed,
                enc_precision,
                comfy,
                half,
            ],
            outputs=enc_outputs,
            **js_kwargs(js),
        )
        dec_outputs = [dec_gallery, infotexts, info, dec_log]
        handler, js = wiring.event("decode", _decode_action(host), len(dec_outputs))
        dec_btn.click(
            handler,
            inputs=[
                task_id,
                dec_files,
                dec_dir,
                vae,
                fmt,
                pattern,
                dec_precision,
                chunk,
                nan_check,
                ladder,
                tiling,
                tile_mode,
                tile_size,
            ],
            outputs=dec_outputs,
            **js_kwargs(js),
        )
        for stop in (enc_stop, dec_stop):
            stop.click(wiring.interrupt, inputs=[], outputs=[], queue=False)
        dec_gallery.select(_selected_infotext, inputs=[infotexts], outputs=[info], queue=False)
    return blocks
