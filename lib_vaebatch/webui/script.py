"""The "VAE Batch" AlwaysVisible script (txt2img and img2img).

``scripts/vaebatch.py`` imports :class:`VaeBatchScript` into its own namespace, which is how the
webui finds it; this module imports ``modules.scripts`` as a module (``from modules import
scripts``), so the base class itself is never registered.
"""

from __future__ import annotations

import html
import json
import os
from typing import Any

from modules import scripts

from lib_vaebatch.forge import host as forge
from lib_vaebatch.webui import args as A
from lib_vaebatch.webui import takeover as T

#: X/Y/Z plot axes write their values here; they win over the script's own arguments.
from lib_vaebatch.webui.xyz import OVERRIDES_ATTR

JOB_ATTR = "vaebatch_job"


def settings_values() -> dict[str, Any]:
    from modules import shared

    data = getattr(shared.opts, "data", {}) or {}
    values = A.defaults(data)
    values["enabled"] = bool(data.get(A.BY_NAME["enabled"].setting_key, False))
    return values


def no_vae_to_drive(sd_model: Any) -> bool:
    """A model whose VAE neither the webui glue nor the Forge adapters can reach (a Forge-shaped
    model outside a Forge process, say). On Forge the choice is made per decode, from the model
    being decoded (hires fix may switch checkpoints)."""
    if forge.current_host() is not None:
        return False
    return getattr(sd_model, "first_stage_model", None) is None


class VaeBatchScript(scripts.Script):
    sorting_priority = 20
    section = "accordions"
    create_group = False

    def title(self) -> str:
        return A.TITLE

    def show(self, is_img2img: bool) -> Any:
        return scripts.AlwaysVisible

    # -- UI ----------------------------------------------------------------------------------------
    def ui(self, is_img2img: bool) -> list[Any]:
        import gradio as gr
        from modules.ui_components import InputAccordion

        values = settings_values()
        controls: dict[str, Any] = {}
        first = A.ARGS[0]
        with InputAccordion(
            values["enabled"], label=first.label, elem_id=self.elem_id(first.elem_suffix)
        ) as enabled:
            controls[first.name] = enabled
            with gr.Row():
                for arg in A.ARGS[1:]:
                    controls[arg.name] = self._component(gr, arg, values[arg.name])
            help_json = html.escape(json.dumps(A.help_table()), quote=True)
            gr.HTML(
                f'<div class="vaebatch-help" data-help="{help_json}" hidden></div>',
                elem_id=self.elem_id("help"),
            )
        base = dict(values)

        def from_params(name: str) -> Any:
            return lambda params: A.from_infotext(params, base=base)[name]

        self.infotext_fields = [(controls[a.name], from_params(a.name)) for a in A.ARGS]
        self.paste_field_names = [A.TITLE] + [a.infotext for a in A.ARGS if a.infotext]
        return [controls[a.name] for a in A.ARGS]

    def _component(self, gr: Any, arg: A.Arg, value: Any) -> Any:
        elem_id = self.elem_id(arg.elem_suffix)
        if arg.kind == "bool":
            return gr.Checkbox(value=value, label=arg.label, elem_id=elem_id)
        if arg.kind == "int":
            return gr.Slider(
                minimum=arg.minimum,
                maximum=arg.maximum,
                step=arg.step,
                value=value,
                label=arg.label,
                elem_id=elem_id,
            )
        if len(arg.choices) <= 3:
            return gr.Radio(choices=list(arg.choices), value=value, label=arg.label, elem_id=elem_id)
        return gr.Dropdown(choices=list(arg.choices), value=value, label=arg.label, elem_id=elem_id)

    # -- generation --------------------------------------------------------------------------------
    def process(self, p: Any, *args: Any) -> None:
        T.unwrap_methods(p)
        setattr(p, JOB_ATTR, None)
        try:
            values = A.from_positional(args, base=settings_values())
            for name, value in (getattr(p, OVERRIDES_ATTR, None) or {}).items():
                values[name] = A.BY_NAME[name].coerce(value)
        except ValueError as exc:
            T.say(f"{exc}; VAE Batch is off for this generation")
            if A.asked_for(args, getattr(p, OVERRIDES_ATTR, None)):
                # the infotext (and so the API's info) says it was off, and why
                p.extra_generation_params[A.TITLE] = f"off ({str(exc).removeprefix(f'{A.TITLE}: ')})"
            return
        if not values["enabled"]:
            return
        from modules import shared

        if no_vae_to_drive(p.sd_model):
            T.say(
                "this model has no first_stage_model and this is not a Forge: the decode stays with the webui"
            )
            return
        method = getattr(shared.opts, "sd_vae_decode_method", "Full")
        if method != "Full":
            T.say(f"'VAE type for decode' is {method}: those decodes stay with the webui")
            return
        encode_init = bool(getattr(p, "init_images", None)) and bool(
            getattr(shared.opts, A.EXTRA_SETTINGS[0].setting_key, False)
        )
        job = T.Job(values=values, p=p, encode_init=encode_init)
        setattr(p, JOB_ATTR, job)
        # The "VAE Batch" entry itself is written by the engine's final decode (Job.decode), so an
        # image carries it only when the engine really decoded it.
        p.extra_generation_params.update(A.infotext_options(values))
        T.wrap_method(p, "sample", T.DECODE, job)
        if encode_init:
            T.wrap_method(p, "init", T.ENCODE, job)

    def process_batch(self, p: Any, *args: Any, **kwargs: Any) -> None:
        job = getattr(p, JOB_ATTR, None)
        if job is not None:
            job.hr_started = False

    def before_hr(self, p: Any, *args: Any) -> None:
        job = getattr(p, JOB_ATTR, None)
        if job is not None:
            job.hr_started = True

    def post_sample(self, p: Any, ps: Any, *args: Any) -> None:
        job = getattr(p, JOB_ATTR, None)
        samples = ps.samples
        if job is None or getattr(samples, "already_decoded", False):
            return  # hires fix: the final decode already went through the engine (or core)
        if job.nan_check() and not T.all_finite(samples):
            T.say("the UNet output holds NaN/Inf: leaving it to the webui's own check")
            return
        from modules import processing

        try:
            images = job.decode(p.sd_model, samples, final=True)
        except T.InputError as exc:
            T.say(f"{exc}; this decode is left to the webui")
            p.extra_generation_params[A.TITLE] = "left to the webui"
            return
        ps.samples = processing.DecodedSamples(images)

    def postprocess(self, p: Any, processed: Any, *args: Any) -> None:
        job = getattr(p, JOB_ATTR, None)
        T.unwrap_methods(p)
        if job is None:
            return
        setattr(p, JOB_ATTR, None)
        if job.values["save_latents"] and job.latents:
            try:
                path = save_job_latents(job, p, processed)
                T.say(f"latents saved to {path}")
            except Exception as exc:  # noqa: BLE001 - saving extra files must never cost the images
                T.say(f"could not save latents: {exc}")


def save_job_latents(job: T.Job, p: Any, processed: Any) -> str:
    """All final latents of the job in one latents file under ``<outpath_samples>/latents``."""
    import torch
    from safetensors.torch import save

    from lib_vaebatch.latents import LatentBatch
    from lib_vaebatch.naming import SequentialNamer
    from lib_vaebatch.webui.backend import model_family, model_scaling

    latents = torch.cat(job.latents)
    first = getattr(processed, "index_of_first_image", 0)
    infotexts = list(getattr(processed, "infotexts", []) or [])[first:]
    family = model_family(p.sd_model)
    scale, shift = model_scaling(p.sd_model, family)
    batch = LatentBatch(
        latents=latents,
        family=family.name,
        scaling_factor=scale,
        shift_factor=shift,
        parameters=infotexts if len(infotexts) == len(latents) else None,
    )
    folder = os.path.join(p.outpath_samples, "latents")
    seed = (getattr(p, "all_seeds", None) or [getattr(p, "seed", "")])[0]
    with SequentialNamer(folder).create(str(seed), ".safetensors") as (path, fh):
        fh.write(save({"latents": latents.contiguous()}, metadata=batch.metadata()))
    return str(path)
