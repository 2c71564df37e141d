"""The "Latent Batch" tab inside the webui: the shared UI (:mod:`lib_vaebatch.ui.app`) with the
webui as host — its VAE list (models/VAE, "Automatic" = the loaded checkpoint's VAE), its queue
lock, progress and interrupt (``call_queue.wrap_gradio_gpu_call`` + ``shared.state``), its
``images.save_image`` (filename patterns, metadata, before_image_saved callbacks), Send to
img2img/inpaint, and ``--hide-ui-dir-config``."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from lib_vaebatch.backends.base import VAEBackend
from lib_vaebatch.families import Family
from lib_vaebatch.forge import host as forge
from lib_vaebatch.host import Host, Reporter, UserError
from lib_vaebatch.webui.backend import NoWebuiVAEError, WebuiVAE
from lib_vaebatch.writer import WriteJob

log = logging.getLogger("vaebatch")

AUTOMATIC = "Automatic"
REMOTE_PREFIX = "Remote: "
TAB_TITLE = "Latent Batch"
TAB_ID = "vaebatch_latent_batch"
OUTDIR_KEY = "vaebatch_tab_outdir"
DEFAULT_OUTDIR = "outputs/latent-batch"


def _int_or_none(value: Any) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def processing_like(values: dict[str, Any], width: int, height: int) -> Any:
    """What ``images.save_image`` and before_image_saved callbacks read from ``p``, filled from the
    image's own infotext (reference §4.2: FilenameGenerator's attributes)."""
    from modules import shared

    seed = _int_or_none(values.get("seed"))
    return SimpleNamespace(
        prompt=values.get("prompt") or "",
        negative_prompt=values.get("negative_prompt") or "",
        all_prompts=[values.get("prompt") or ""],
        all_negative_prompts=[values.get("negative_prompt") or ""],
        seed=seed if seed is not None else -1,
        all_seeds=[seed if seed is not None else -1],
        subseed=-1,
        all_subseeds=[-1],
        steps=_int_or_none(values.get("steps")),
        cfg_scale=values.get("cfg"),
        sampler_name=values.get("sampler"),
        scheduler=values.get("scheduler"),
        styles=[],
        width=width,
        height=height,
        batch_size=1,
        n_iter=1,
        iteration=0,
        batch_index=0,
        denoising_strength=values.get("denoising"),
        clip_skip=values.get("clip_skip"),
        user=None,
        job_timestamp=shared.state.job_timestamp,
        sd_model=shared.sd_model,
        sd_model_hash=values.get("model_hash") or getattr(shared.sd_model, "sd_model_hash", None),
        extra_generation_params={},
        outpath_samples=None,
        do_not_save_samples=False,
    )


class WebuiHost(Host):
    vae_help = "Automatic: the loaded checkpoint's VAE; others: files in models/VAE (same architecture)"

    def __init__(self) -> None:
        from modules import shared

        self.hide_dirs = bool(getattr(shared.cmd_opts, "hide_ui_dir_config", False))
        self.save_fn = self.save
        self._file_vae: tuple[str, Any, Any] | None = None  # (label, module or Forge VAE, model)

    # -- VAEs ---------------------------------------------------------------------------------
    def remote_url(self) -> str:
        from modules import shared

        from lib_vaebatch.webui.takeover import REMOTE_URL_KEY

        return str(shared.opts.data.get(REMOTE_URL_KEY) or "").strip()

    def vae_labels(self) -> list[str]:
        from modules import sd_vae

        remote = [REMOTE_PREFIX + self.remote_url()] if self.remote_url() else []
        return [AUTOMATIC, *sorted(sd_vae.vae_dict), *remote]

    def refresh_vaes(self) -> list[str]:
        from modules import sd_vae

        sd_vae.refresh_vae_list()
        return self.vae_labels()

    def default_vae(self) -> str:
        return AUTOMATIC

    def backend(self, label: str, family: Family | None = None) -> VAEBackend:
        from modules import devices, sd_vae, shared

        if forge.current_host() is not None:
            return self._forge_backend(label, family)
        sd_model = shared.sd_model  # loads the checkpoint when none is loaded yet
        if sd_model is None:
            raise UserError("no checkpoint is loaded")
        if label.startswith(REMOTE_PREFIX) and label == REMOTE_PREFIX + self.remote_url():
            from lib_vaebatch.backends.remote import RemoteVAE
            from lib_vaebatch.webui.backend import model_family

            return RemoteVAE(self.remote_url(), family=family or model_family(sd_model))
        try:
            if label == AUTOMATIC:
                return WebuiVAE(sd_model)
            if label not in sd_vae.vae_dict:
                raise UserError(f"unknown VAE {label!r}; press refresh after adding files to models/VAE")
            if self._file_vae is None or self._file_vae[0] != label:
                self._file_vae = None
                fsm = sd_model.first_stage_model
                if fsm is None:
                    raise NoWebuiVAEError("no first_stage_model")
                module = copy.deepcopy(fsm).to("cpu")
                try:
                    module.load_state_dict(sd_vae.load_vae_dict(sd_vae.vae_dict[label], map_location="cpu"))
                except RuntimeError as exc:
                    raise UserError(f"{label} does not fit the loaded checkpoint's VAE: {exc}") from None
                module.to(devices.device, devices.dtype_vae)
                self._file_vae = (label, module, sd_model)
            return WebuiVAE(sd_model, module=self._file_vae[1], name=label)
        except NoWebuiVAEError:
            raise UserError(
                "this webui keeps its VAE outside first_stage_model (Forge): the tab cannot drive it"
            ) from None

    def _forge_backend(self, label: str, family: Family | None) -> VAEBackend:
        """On Forge: the checkpoint's VAE (loading the checkpoint first if Forge has not yet), or
        a models/VAE file built with the variant's own VAE class; both moved by Forge's memory
        manager. Runs on Forge's main thread (see :func:`webui_wiring`)."""
        from modules import sd_vae

        try:
            sd_model = forge.loaded_model()
        except Exception as exc:  # noqa: BLE001 - Forge's loader raises ValueError/AssertionError...
            raise UserError(f"Forge could not load the checkpoint: {exc}") from None
        backend = forge.backend_for(sd_model)
        if backend is None:
            raise UserError("no checkpoint is loaded")
        if label.startswith(REMOTE_PREFIX) and label == REMOTE_PREFIX + self.remote_url():
            from lib_vaebatch.backends.remote import RemoteVAE

            return RemoteVAE(self.remote_url(), family=family or backend.family)
        if label == AUTOMATIC:
            return backend
        if label not in sd_vae.vae_dict:
            raise UserError(f"unknown VAE {label!r}; press refresh after adding files to models/VAE")
        if self._file_vae is None or self._file_vae[0] != label or self._file_vae[2] is not sd_model:
            self._file_vae = None
            try:
                vae = forge.vae_from_file(sd_model, sd_vae.vae_dict[label])
            except (RuntimeError, ValueError, KeyError) as exc:
                raise UserError(f"{label} does not fit the loaded checkpoint's VAE: {exc}") from None
            self._file_vae = (label, vae, sd_model)
        out = forge.backend_for(sd_model, vae=self._file_vae[1], name=label)
        assert out is not None
        return out

    def output_dir(self) -> Path:
        from modules import shared

        return Path(shared.opts.data.get(OUTDIR_KEY) or DEFAULT_OUTDIR)

    # -- saving through the webui ------------------------------------------------------------
    def save(self, job: WriteJob) -> Path:
        from modules import images

        img = job.image
        p = processing_like(job.values, img.width, img.height)
        seed = _int_or_none(job.values.get("seed"))
        fullfn, _ = images.save_image(
            img,
            str(self.output_dir() / "images"),
            "",
            seed=seed,
            prompt=p.prompt,
            extension=job.fmt,
            info=job.infotext,
            p=p,
        )
        return Path(fullfn)


# -- UI wiring ----------------------------------------------------------------------------------
def webui_wiring() -> Any:
    from modules import call_queue, shared

    from lib_vaebatch.ui.app import Wiring

    def event(kind: str, action: Any, n_outputs: int) -> tuple[Any, str]:
        def run(_task_id: str, *values: Any) -> list[Any]:
            state = shared.state

            def progress(done: int, total: int, text: str) -> None:
                state.job_count = total
                state.job_no = done
                state.textinfo = f"VAE Batch: {text or kind} {done}/{total}"

            report = Reporter(progress=progress, cancel=lambda: bool(state.interrupted or state.skipped))
            state.textinfo = f"VAE Batch: {kind}"
            return forge.on_main_thread(action, report, *values)  # Forge: where models move

        wrapped = call_queue.wrap_gradio_gpu_call(run, extra_outputs=[None] * (n_outputs - 1))
        return wrapped, f"function(){{ return vaebatch.submit({json.dumps(kind)}, arguments); }}"

    def interrupt() -> None:
        shared.state.interrupt()

    def decode_extras(gallery: Any, info: Any) -> None:
        import gradio as gr

        try:
            from modules import infotext_utils as paste
        except ImportError:  # before 1.8
            from modules import generation_parameters_copypaste as paste  # type: ignore[no-redef]
        with gr.Row():
            buttons = paste.create_buttons(["img2img", "inpaint"])
        for tabname, button in buttons.items():
            paste.register_paste_params_button(
                paste.ParamBinding(
                    paste_button=button,
                    tabname=tabname,
                    source_text_component=info,
                    source_image_component=gallery,
                )
            )

    return Wiring(event=event, interrupt=interrupt, decode_extras=decode_extras, formats=image_formats())


def image_formats() -> tuple[str, ...]:
    try:
        import pillow_avif  # noqa: F401 - the webui ships it; registers AVIF with Pillow
    except ImportError:
        return ("png", "jpg", "webp")
    return ("png", "jpg", "webp", "avif")


def on_ui_tabs() -> list[tuple[Any, str, str]]:
    from lib_vaebatch.ui.app import build_ui

    blocks = build_ui(WebuiHost(), webui_wiring())
    return [(blocks, TAB_TITLE, TAB_ID)]
