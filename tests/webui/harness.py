"""Starts the fake webui (``modules`` from tests/webui/fakewebui) the way the webui starts: the
extension's scripts/ executed, settings and UI built for txt2img and img2img. Shared by the A1111
fixture (tests/webui/conftest.py) and the Forge fixtures (tests/forge/conftest.py), which put
Forge's own packages beside it and give ``modules`` Forge's decode path."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
FAKE = Path(__file__).resolve().parent / "fakewebui"
HOST_ROOTS = ("modules", "modules_forge", "backend", "ldm_patched")


def purge() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in HOST_ROOTS or name.startswith(("lib_vaebatch.webui", "lib_vaebatch.forge")):
            del sys.modules[name]


@contextlib.contextmanager
def fake_webui(
    extra_paths: Sequence[Path] = (), *, setup: Callable[[], Any] | None = None
) -> Iterator[SimpleNamespace]:
    """``setup()`` runs after ``modules`` is importable and before the scripts load; it returns the
    model to put in ``shared.sd_model`` (None: the A1111 fake's ldm model)."""
    purge()
    paths = [str(FAKE), *map(str, extra_paths)]
    for p in reversed(paths):
        sys.path.insert(0, p)
    try:
        from modules import devices, processing, script_callbacks, scripts, shared
        from modules.api import api

        from tests.webui import fakemodels

        shared.reset()
        model = setup() if setup is not None else None
        shared.sd_model = model if model is not None else fakemodels.LatentDiffusion(fakemodels.ldm_vae())
        scripts.load_scripts(str(ROOT))
        script_callbacks.ui_settings_callback()
        script_callbacks.before_ui_callback()
        runners = {}
        for tab, is_img2img in (("txt2img", False), ("img2img", True)):
            runner = scripts.ScriptRunner(is_img2img)
            runner.initialize_scripts()
            runner.setup_ui()
            runners[tab] = runner
        defaults = {tab: api.init_default_script_args(r) for tab, r in runners.items()}
        original = processing.decode_latent_batch

        def run(tab="txt2img", alwayson=None, **kw):
            runner = runners[tab]
            script_args = api.init_script_args(alwayson or {}, defaults[tab], runner)
            cls = (
                processing.StableDiffusionProcessingImg2Img
                if tab == "img2img"
                else processing.StableDiffusionProcessingTxt2Img
            )
            p = cls(scripts_runner=runner, script_args=script_args, **kw)
            shared.state.begin()
            torch.manual_seed(0)  # the webui's encode samples the posterior with the global RNG
            try:
                return p, processing.process_images(p)
            finally:
                shared.state.end()

        yield SimpleNamespace(
            shared=shared, devices=devices, processing=processing, scripts=scripts,
            callbacks=script_callbacks, api=api, models=fakemodels, runners=runners, defaults=defaults,
            run=run, original_decode=original,
        )  # fmt: skip
        script_callbacks.script_unloaded_callback()
    finally:
        for p in paths:
            sys.path.remove(p)
        purge()
