"""Decode takeover for one generation: the job state, the engine call, and the scoped replacement
of ``modules.processing.decode_latent_batch`` that covers the hires-fix decode sites.

The replacement is installed only while an enabled job's ``p.sample`` (which holds every hires-fix
decode) or ``p.init`` (img2img init-image encode, when the setting asks) runs, in ``try/finally``;
while installed it serves only the thread whose job installed it, every other caller gets the
original. :func:`restore_all` (on "Reload UI") puts the originals back whatever happened.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from lib_vaebatch.devices import dtype_name
from lib_vaebatch.engine.decode import InputError, decode_latents
from lib_vaebatch.engine.encode import encode_pixels
from lib_vaebatch.engine.options import EngineOptions
from lib_vaebatch.engine.results import BatchResult, Status
from lib_vaebatch.forge import host as forge
from lib_vaebatch.forge.backend import ForgeVAE
from lib_vaebatch.webui import args as A
from lib_vaebatch.webui.backend import WebuiVAE

#: Settings key of the remote VAE endpoint (script option "VAE" = remote, and the Latent Batch tab).
REMOTE_URL_KEY = "vaebatch_remote_url"
#: The infotext label of the "VAE" choice, which says what really decoded.
BACKEND_LABEL = A.BY_NAME["backend"].infotext
#: "webui settings" on a Forge without the webui's VAE precision settings (Neo): our own ladder.
FORGE_DEFAULT_LADDER = A.LADDERS["bf16, fp32"]


class HandBack(InputError):  # noqa: N818 - not an error: a hand-over
    """A decode the engine leaves to the host's own (the message says why)."""


def points_at_this_webui(url: str, cmd_opts: Any) -> bool:
    """Whether ``url`` is this webui's own server (its port on a local name)."""
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    own_port = int(getattr(cmd_opts, "port", None) or 7860)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    local = {"127.0.0.1", "localhost", "0.0.0.0", "::1", str(getattr(cmd_opts, "server_name", "") or "")}
    return port == own_port and (parts.hostname or "") in local


def say(message: str) -> None:
    """One console line, prefixed ``[VAE Batch]``."""
    print(f"{A.LOG_PREFIX} {message}", flush=True)


@dataclass
class Job:
    """One enabled generation."""

    values: dict[str, Any]
    p: Any
    encode_init: bool = False
    hr_started: bool = False  # before_hr ran for the current batch: decodes now are final decodes
    latents: list[torch.Tensor] = field(default_factory=list)  # final latents, for "save latents"
    results: list[BatchResult] = field(default_factory=list)

    # -- what the webui says ---------------------------------------------------------------------
    def options(self) -> EngineOptions:
        from modules import shared

        opts, cmd = shared.opts, shared.cmd_opts
        choice = self.values["ladder"]
        if (
            A.LADDERS.get(choice, ()) is None
            and forge.current_host() is not None
            and not forge.has_setting("auto_vae_precision")
        ):
            ladder: tuple[str, ...] = FORGE_DEFAULT_LADDER or ()
        else:
            ladder = A.ladder_for(
                choice,
                webui_bf16=bool(getattr(opts, "auto_vae_precision_bfloat16", False)),
                webui_fp32=bool(getattr(opts, "auto_vae_precision", True)),
            )
        return A.engine_options(
            self.values, ladder=ladder, nan_check_allowed=not getattr(cmd, "disable_nan_check", False)
        )

    def nan_check(self) -> bool:
        return self.options().nan_check

    def _not_remote(self, own: Any, why: str) -> tuple[Any, dict[str, float]]:
        """The model's own VAE in place of the remote one asked for; the infotext says which ran."""
        self.p.extra_generation_params[BACKEND_LABEL] = f"webui ({why})"
        return own, {}

    def backend(self, sd_model: Any) -> tuple[Any, dict[str, float]]:
        """The decode backend and the scaling to hand the engine: the model's own VAE (the webui's
        first_stage_model, or Forge's forge_objects.vae), or the remote endpoint from Settings with
        the current model's scaling."""
        own = forge.backend_for(sd_model) or WebuiVAE(sd_model)
        if self.values.get("backend") != "remote":
            return own, {}
        from modules import shared

        from lib_vaebatch.backends.remote import RemoteVAE
        from lib_vaebatch.webui.backend import model_family, model_scaling

        url = str(shared.opts.data.get(REMOTE_URL_KEY) or "").strip()
        if not url:
            say("VAE = remote, but Settings > VAE Batch names no remote endpoint: using the webui VAE")
            return self._not_remote(own, "remote asked, no endpoint set")
        if points_at_this_webui(url, shared.cmd_opts):
            say(
                "the remote endpoint is this webui itself, whose queue lock this generation holds: "
                "using the webui VAE"
            )
            return self._not_remote(own, "remote asked, the endpoint is this webui")
        if isinstance(own, ForgeVAE):
            family, (scale, shift) = own.family, (own.scaling_factor, own.shift_factor)
        else:
            family = model_family(sd_model)
            scale, shift = model_scaling(sd_model, family)
        return RemoteVAE(url, family=family), {"scaling_factor": scale, "shift_factor": shift}

    # -- decode ----------------------------------------------------------------------------------
    def decode(self, sd_model: Any, latents: torch.Tensor, *, final: bool) -> list[torch.Tensor]:
        """Latents (sampler space) to CHW images in [-1, 1]. A ``final`` decode may stop early on
        Interrupt/Skip pressed during it (the finished leading images are returned); the first-pass
        decode of hires fix always completes (hires fix needs every image)."""
        from modules import devices, shared

        state = shared.state
        backend, scaling = self.backend(sd_model)
        options = self.options()
        n = latents.shape[0]
        pressed = (bool(state.interrupted), bool(state.skipped))

        def cancel() -> bool:
            if not final:
                return False
            # Only a press during this decode stops it: after an interrupted sampling the webui
            # still decodes what was sampled, and so do we.
            return (state.interrupted and not pressed[0]) or (state.skipped and not pressed[1])

        def progress(done: int, total: int, text: str) -> None:
            state.textinfo = f"VAE Batch: decoding {done}/{total}"

        z: torch.Tensor = latents
        kwargs: dict[str, Any] = dict(scaling)
        on_forge = isinstance(backend, ForgeVAE)
        if on_forge:
            reason = backend.hand_back_reason(latents)
            if reason is not None:
                raise HandBack(f"{backend.adapter.host.label}: {reason}")
            z, kwargs = backend.to_raw(latents), {"scaled": False}  # Forge's own scaling, in its order
        state.textinfo = f"VAE Batch: decoding 0/{n}"
        result = decode_latents(backend, z, options=options, progress=progress, cancel=cancel, **kwargs)
        self.results.append(result)
        summary = self._forge_finish(backend, z, result) if on_forge else result.summary()
        if options.keep_recovered_dtype and on_forge and backend.dtype != backend.vae.vae_dtype:
            say(f"keeping the VAE in {dtype_name(backend.dtype)} as asked (Forge's vae_dtype updated)")
            backend.keep_dtype()
        elif options.keep_recovered_dtype and not on_forge and backend.dtype != devices.dtype_vae:
            say(f"keeping the VAE in {dtype_name(backend.dtype)} as asked (devices.dtype_vae updated)")
            devices.dtype_vae = backend.dtype
        for event in result.events:
            if event.startswith(("out of memory", "recovered", "cancel")):
                say(event)
        images = self._assemble(result, latents)
        if final:
            self.p.extra_generation_params[A.TITLE] = summary
            if self.values["save_latents"]:
                self.latents.append(latents[: len(images)].detach().to("cpu", torch.float32))
        state.textinfo = None
        return images

    def _forge_finish(self, backend: ForgeVAE, raw: torch.Tensor, result: BatchResult) -> str:
        """On Forge: as the very last rung, decode what ran out of memory even in our smallest
        tiles with Forge's own 3-pass tiles (approximate, and labelled so), and say what a
        recovery ran in (Forge built the weights in its dtype). Returns the infotext summary."""
        rescued: set[int] = set()
        for rep in result.reports:
            if rep.status is not Status.FAILED or not rep.message.startswith("out of memory"):
                continue
            try:
                out = backend.forge_tiled_decode(raw[rep.index : rep.index + 1])[0]
            except Exception as exc:  # noqa: BLE001 - the sample stays failed, with both reasons
                rep.message += f"; Forge's own tiled decode failed too ({type(exc).__name__})"
                continue
            result.outputs[rep.index] = out
            rep.status, rep.tiled = Status.RECOVERED, True
            rep.message += "; decoded by Forge's own 3-pass tiles (approximate)"
            rescued.add(rep.index)
        ours = dataclasses.replace(result, reports=[r for r in result.reports if r.index not in rescued])
        parts = [] if ours.summary() == "on" else [ours.summary()]
        if rescued:
            say(
                f"{len(rescued)} image(s) ran out of memory even in our smallest tiles: decoded by "
                "Forge's own 3-pass tiles (approximate)"
            )
            parts.append(f"Forge 3-pass tiles ×{len(rescued)}")
        notes = {
            note
            for r in ours.reports
            if r.status is Status.RECOVERED and r.dtype and (note := backend.weights_note(r.dtype))
        }
        for note in sorted(notes):
            say(f"recovered samples ran in {note}")
            parts.append(note)
        return ", ".join(parts) or "on"

    def _assemble(self, result: BatchResult, latents: torch.Tensor) -> list[torch.Tensor]:
        """The images in batch order. A sample that failed for good becomes a black image (what the
        webui's own decode leaves for an all-NaN result) so every other image keeps its seed and
        infotext; a cancelled run returns only the finished leading images."""
        n = len(result.reports)
        keep = n
        if result.cancelled:
            keep = next((r.index for r in result.reports if r.status is Status.CANCELLED), n)
            say(f"decode stopped by the user: keeping {keep} of {n} images")
        shape = next((o.shape for o in result.outputs if o is not None), None)
        if shape is None:
            h, w = latents.shape[-2:]
            shape = torch.Size((3, h * 8, w * 8))
        images: list[torch.Tensor] = []
        for i in range(keep):
            out = result.outputs[i]
            if out is None:
                rep = result.reports[i]
                say(f"image {i + 1} of {n} could not be decoded ({rep.message}); it is left black")
                out = torch.full(shape, -1.0)
            images.append(out.float().cpu() if out.device.type == "cpu" else out.float())
        return images

    # -- encode (img2img init images, optional) ----------------------------------------------------
    def encode(self, sd_model: Any, image: torch.Tensor) -> torch.Tensor:
        """Init images ``[B, 3, H, W]`` in [0, 1] to sampler-space latents (posterior mean)."""
        backend = forge.backend_for(sd_model) or WebuiVAE(sd_model)
        pixels = image.float().cpu() * 2.0 - 1.0
        result = encode_pixels(backend, pixels, options=self.options())
        if not result.ok:
            bad = "; ".join(f"image {r.index + 1}: {r.message}" for r in result.failed)
            raise RuntimeError(f"{A.LOG_PREFIX} init image encode failed: {bad}")
        return torch.stack([o for o in result.outputs if o is not None]).to(backend.device, backend.dtype)


def all_finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())


def raise_unet_nans() -> None:
    """Raise the webui's own NansException for a UNet output (core's wording, via core)."""
    from modules import devices

    devices.test_for_nans(torch.full((1,), float("nan")), "unet")
    raise devices.NansException("A tensor with NaNs was produced in Unet.")  # --disable-nan-check


class _Swap:
    """A scoped, reference-counted, thread-aware replacement of one module attribute."""

    def __init__(self, module_name: str, attr: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]):
        self.module_name, self.attr, self.make = module_name, attr, make
        self.original: Callable[..., Any] | None = None
        self.replacement: Callable[..., Any] | None = None
        self.depth = 0
        self.lock = threading.RLock()
        self.local = threading.local()

    def _module(self) -> Any:
        import importlib

        return importlib.import_module(self.module_name)

    def job(self) -> Job | None:
        return getattr(self.local, "job", None)

    @contextlib.contextmanager
    def active(self, job: Job) -> Iterator[None]:
        with self.lock:
            mod = self._module()
            if self.depth == 0:
                self.original = getattr(mod, self.attr)
                self.replacement = self.make(self.original)
                setattr(mod, self.attr, self.replacement)
            self.depth += 1
        previous, self.local.job = self.job(), job
        try:
            yield
        finally:
            self.local.job = previous
            with self.lock:
                self.depth -= 1
                if self.depth == 0:
                    self._put_back()

    def _put_back(self) -> None:
        mod = self._module()
        if getattr(mod, self.attr, None) is self.replacement and self.original is not None:
            setattr(mod, self.attr, self.original)
        elif self.replacement is not None and getattr(mod, self.attr, None) is not self.original:
            say(f"{self.module_name}.{self.attr} was replaced by someone else meanwhile; leaving theirs")
        self.original = self.replacement = None

    def restore(self) -> None:
        with self.lock:
            if self.depth or self.replacement is not None:
                self._put_back()
            self.depth = 0

    @property
    def installed(self) -> bool:
        return self.replacement is not None


def _decode_latent_batch(original: Callable[..., Any]) -> Callable[..., Any]:
    def decode_latent_batch(
        model: Any, batch: Any, target_device: Any = None, check_for_nans: bool = False
    ) -> Any:
        job = DECODE.job()
        if job is None or not isinstance(batch, torch.Tensor):
            return original(model, batch, target_device=target_device, check_for_nans=check_for_nans)
        from modules import processing

        if check_for_nans and job.nan_check() and not all_finite(batch):
            if forge.backend_for(model) is not None:  # Forge has no NaN check of its own: its way
                return original(model, batch, target_device=target_device, check_for_nans=check_for_nans)
            raise_unet_nans()
        try:
            images = job.decode(model, batch, final=job.hr_started)
        except InputError as exc:
            say(f"{exc}; this decode is left to the webui")
            return original(model, batch, target_device=target_device, check_for_nans=check_for_nans)
        if target_device is not None:
            images = [im.to(target_device) for im in images]
        return processing.DecodedSamples(images)

    decode_latent_batch.vaebatch = True  # type: ignore[attr-defined]
    return decode_latent_batch


def _images_tensor_to_samples(original: Callable[..., Any]) -> Callable[..., Any]:
    def images_tensor_to_samples(image: Any, approximation: Any = None, model: Any = None) -> Any:
        job = ENCODE.job()
        if job is None or approximation not in (None, 0) or not isinstance(image, torch.Tensor):
            return original(image, approximation, model)
        from modules import shared

        from_model = model if model is not None else shared.sd_model
        if approximation is None and getattr(shared.opts, "sd_vae_encode_method", "Full") != "Full":
            return original(image, approximation, model)
        return job.encode(from_model, image)

    images_tensor_to_samples.vaebatch = True  # type: ignore[attr-defined]
    return images_tensor_to_samples


DECODE = _Swap("modules.processing", "decode_latent_batch", _decode_latent_batch)
ENCODE = _Swap("modules.processing", "images_tensor_to_samples", _images_tensor_to_samples)


def restore_all() -> None:
    DECODE.restore()
    ENCODE.restore()


def wrap_method(p: Any, name: str, swap: _Swap, job: Job) -> None:
    """Make ``p.<name>`` (an instance attribute, so only this job) run inside ``swap.active``.
    Idempotent: a second call for the same job does nothing."""
    current = getattr(p, name)
    if getattr(current, "vaebatch_job", None) is job:
        return

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with swap.active(job):
            return current(*args, **kwargs)

    wrapped.vaebatch_job = job  # type: ignore[attr-defined]
    setattr(p, name, wrapped)


def unwrap_methods(p: Any) -> None:
    for name in ("sample", "init"):
        if getattr(p.__dict__.get(name), "vaebatch_job", None) is not None:
            del p.__dict__[name]
