"""The "Latent Batch" tab and the /vaebatch/v1 routes on Forge (fake hosts): work runs on Forge's
main thread under the queue lock, the checkpoint is loaded first where Forge has not yet, the VAE
is loaded by Forge's memory manager, encodes are deterministic (posterior mean, where Forge 2 and
Neo's own encode samples), VAE files are built with the variant's own VAE class."""

from __future__ import annotations

import base64
import threading

import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save_file

from lib_vaebatch.latents import read_latents
from tests.forge.hosts import ldm_state
from tests.webui.test_tab import FOX, _component, _images, decode, encode


@pytest.fixture
def tab(forge_fresh, tmp_path, monkeypatch):
    from modules import sd_vae

    monkeypatch.chdir(tmp_path)
    vae_dir = tmp_path / "models" / "VAE"
    vae_dir.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in ldm_state(seed=5).items()}, vae_dir / "other.safetensors")
    sd_vae.vae_path = str(vae_dir)
    sd_vae.refresh_vae_list()
    forge_fresh.shared.opts.data["vaebatch_tab_outdir"] = str(tmp_path / "lb")
    ((blocks, _title, _id),) = forge_fresh.callbacks.ui_tabs_callback()
    forge_fresh.blocks = blocks
    forge_fresh.out = tmp_path / "lb"
    return forge_fresh


def test_round_trip_on_forge_main_thread_with_the_model_loaded_first(tab, tmp_path):
    from modules import sd_models
    from modules_forge import main_thread

    placeholder = tab.variant.name != "classic"
    assert hasattr(tab.shared.sd_model, "forge_objects") != placeholder
    files, _previews, log = encode(tab, _images(tmp_path / "in"))
    assert "encoded 2/2" in log, log
    model = tab.shared.sd_model
    assert hasattr(model, "forge_objects"), "the tab loaded the checkpoint"
    assert sd_models.reload_calls == ([1] if placeholder else [])
    assert main_thread.ran_on and set(main_thread.ran_on) == {"forge-main-thread"}
    assert any(c[0] == "load" and c[1] == [model.forge_objects.vae.patcher] for c in tab.mm.calls)
    # Deterministic: the posterior mean, scaled the way the variant scales it.
    again, _, _ = encode(tab, _images(tmp_path / "in2"))
    first, second = read_latents(files[0]), read_latents(again[0])
    assert torch.equal(first.latents, second.latents)
    from lib_vaebatch.forge.host import backend_for

    backend = backend_for(model)
    x = torch.from_numpy(np.array(Image.open(tmp_path / "in" / "fox.png"))).float()
    x = (x / 127.5 - 1).permute(2, 0, 1)[None]
    mean = model.forge_objects.vae.first_stage_model.encode_moments(x).chunk(2, dim=1)[0]
    expect = (mean - backend.shift_factor) * backend.scaling_factor
    torch.testing.assert_close(first.latents[:1], expect, atol=1e-4, rtol=1e-4)
    assert first.parameters[0] == FOX

    gallery, _infotexts, info, log = decode(tab, files)
    assert "decoded and saved 2/2" in log and len(gallery) == 2 and info.startswith("a red fox")
    # Same pixels as Forge's own decode of those latents.
    own = model.decode_first_stage(first.latents[:1])
    ours = torch.from_numpy(np.array(Image.open(gallery[0][0]), dtype=np.float32)).permute(2, 0, 1) / 255.0
    ref = ((own[0] + 1) / 2).clamp(0, 1)
    assert (ours - ref).abs().max().item() <= 1.5 / 255


def test_a_vae_file_is_built_with_the_variants_own_class(tab, tmp_path):
    files, _, _ = encode(tab, _images(tmp_path / "in"))
    model = tab.shared.sd_model
    before = {k: v.clone() for k, v in model.forge_objects.vae.first_stage_model.state_dict().items()}
    dropdown = _component(tab.blocks, "vaebatch_lb_vae")
    names = [c if isinstance(c, str) else c[0] for c in dropdown.choices]
    assert "other.safetensors" in names
    g_auto, *_ = decode(tab, files, vae="Automatic")
    g_other, _, info, log = decode(tab, files, vae="other.safetensors")
    assert "decoded and saved 2/2" in log and "VAE Batch VAE: other.safetensors" in info
    a = np.array(Image.open(g_auto[0][0]), dtype=float)
    b = np.array(Image.open(g_other[0][0]), dtype=float)
    assert abs(a - b).mean() > 1.0
    from lib_vaebatch.webui import tab as tab_module  # the file VAE is the variant's own class

    loaded = [h for h in _hosts(tab_module) if h._file_vae is not None]
    kind = type(loaded[0]._file_vae[1])
    assert kind.__module__ == (
        "backend.patcher.vae" if tab.variant.backend == "new" else "ldm_patched.modules.sd"
    )
    after = model.forge_objects.vae.first_stage_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the checkpoint's VAE is untouched"


def _hosts(tab_module):
    import gc

    return [o for o in gc.get_objects() if isinstance(o, tab_module.WebuiHost)]


def test_routes_decode_on_forge_under_the_lock_on_the_main_thread(forge_fresh, tmp_path, monkeypatch):
    from modules import call_queue
    from modules_forge import main_thread

    monkeypatch.chdir(tmp_path)
    app = FastAPI()
    forge_fresh.callbacks.app_started_callback(None, app)
    client = TestClient(app)
    # what the lock and the thread were at each run of the VAE's decoder (whichever model the
    # route loads first): a global hook, removed after the request
    at_decode: list[tuple[bool, str]] = []

    def seen(module, _args):  # type: ignore[no-untyped-def]
        if type(module).__name__ == "Decoder":
            at_decode.append((call_queue.queue_lock.locked(), threading.current_thread().name))

    hook = torch.nn.modules.module.register_module_forward_pre_hook(seen)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    payload = {
        "tensor": base64.b64encode(z.numpy().tobytes()).decode(),
        "shape": [2, 4, 8, 8],
        "dtype": "float32",
    }
    try:
        r = client.post("/vaebatch/v1/decode", json=payload)
    finally:
        hook.remove()
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["status"] for x in body["results"]] == ["ok", "ok"]
    assert f"VAE Batch VAE: {forge_fresh.variant.label} VAE" in body["infotexts"][0]
    assert set(main_thread.ran_on) == {"forge-main-thread"}
    assert hasattr(forge_fresh.shared.sd_model, "forge_objects")
    assert at_decode and set(at_decode) == {(True, "forge-main-thread")}, at_decode
    assert not call_queue.queue_lock.locked(), "released after the request"
