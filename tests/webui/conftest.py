"""The fake webui, loaded fresh for every test: ``modules`` from tests/webui/fakewebui, the
extension's scripts/ executed the way the webui executes them, UI built for txt2img and img2img."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
FAKE = Path(__file__).resolve().parent / "fakewebui"


def _purge() -> None:
    for name in list(sys.modules):
        if name == "modules" or name.startswith(("modules.", "lib_vaebatch.webui")):
            del sys.modules[name]


@pytest.fixture
def webui():
    _purge()
    sys.path.insert(0, str(FAKE))
    try:
        from modules import devices, processing, script_callbacks, scripts, shared
        from modules.api import api

        from tests.webui import fakemodels

        shared.reset()
        shared.sd_model = fakemodels.LatentDiffusion(fakemodels.ldm_vae())
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
        sys.path.remove(str(FAKE))
        _purge()
