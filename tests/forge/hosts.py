"""Forge variants as the glue tests see them: the A1111 fake ``modules`` given Forge's decode path
(reference §1: ``decode_latent_batch`` ignores ``check_for_nans`` and decodes the whole batch through
``decode_first_stage`` → ``forge_objects.vae.decode``; ``test_for_nans`` is a no-op, Neo zeroes NaN
latents instead; Neo has no ``auto_vae_precision``), Forge's packages beside it (tests/forge/
fakeforge), and models built the way each variant presents them (§1.4)."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

FAKE = Path(__file__).resolve().parent / "fakeforge"


@dataclass(frozen=True)
class Variant:
    name: str
    backend: str  # "new" | "old"
    version: str
    label: str
    has_auto_vae_precision: bool = True

    @property
    def paths(self) -> list[Path]:
        return [FAKE / "common", FAKE / self.backend]


VARIANTS = {
    "forge": Variant("forge", "new", "2.0.1v1.10.1", "Forge"),
    "neo": Variant("neo", "new", "neo", "Forge Neo", has_auto_vae_precision=False),
    "classic": Variant("classic", "old", "classic", "Forge Classic"),
    "reforge": Variant("reforge", "old", "1.0.0v2-v1.10.1RC", "reForge"),
}


def memory_manager(variant: Variant) -> Any:
    import importlib

    return importlib.import_module(
        "backend.memory_management" if variant.backend == "new" else "ldm_patched.modules.model_management"
    )


# -- models ------------------------------------------------------------------------------------
class ForgeObjects:
    def __init__(self, unet: Any, clip: Any, vae: Any) -> None:
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, vae, None


class NewEngine:
    """backend/diffusion_engine (Forge 2: ``first_stage_model`` is None, base.py:61)."""

    is_sd1, is_sd2, is_sdxl, is_sd3, is_wan = True, False, False, False, False
    lowvram = False  # processing still asks lowvram.is_enabled(sd_model)
    first_stage_model = None

    def __init__(self, vae: Any) -> None:
        self.forge_objects = ForgeObjects(types.SimpleNamespace(), types.SimpleNamespace(), vae)
        self.sd_model_hash = "0123456789"

    @torch.inference_mode()
    def decode_first_stage(self, x):
        sample = self.forge_objects.vae.first_stage_model.process_out(x)
        sample = self.forge_objects.vae.decode(sample).movedim(-1, 1) * 2.0 - 1.0
        return sample.to(x)

    @torch.inference_mode()
    def encode_first_stage(self, x):
        sample = self.forge_objects.vae.encode(x.movedim(1, -1) * 0.5 + 0.5)
        sample = self.forge_objects.vae.first_stage_model.process_in(sample)
        return sample.to(x)

    def get_first_stage_encoding(self, x):
        return x


class NeoEngine(NewEngine):
    """Neo: ``first_stage_model`` is a property returning the Forge VAE's module (base.py:97-102)."""

    @property
    def first_stage_model(self):  # type: ignore[override]
        try:
            return self.forge_objects.vae.first_stage_model
        except Exception:
            return None


class OldModel:
    """Classic / reForge: an A1111 model whose first stage is Forge's module, with
    ``decode_first_stage`` replaced by a closure over the UNet's latent format (forge_loader.py)."""

    is_sd1, is_sd2, is_sdxl, is_sd3 = True, False, False, False
    lowvram = False

    def __init__(self, vae: Any) -> None:
        from ldm_patched.modules.latent_formats import SD15

        unet = types.SimpleNamespace(
            model=types.SimpleNamespace(model_config=types.SimpleNamespace(latent_format=SD15()))
        )
        self.forge_objects = ForgeObjects(unet, types.SimpleNamespace(), vae)
        self.first_stage_model = vae.first_stage_model
        self.sd_model_hash = "0123456789"
        model = self

        @torch.inference_mode()
        def decode_first_stage(x):
            fmt = model.forge_objects.unet.model.model_config.latent_format
            sample = model.forge_objects.vae.decode(fmt.process_out(x)).movedim(-1, 1) * 2.0 - 1.0
            return sample.to(x)

        @torch.inference_mode()
        def encode_first_stage(x):
            fmt = model.forge_objects.unet.model.model_config.latent_format
            return fmt.process_in(model.forge_objects.vae.encode(x.movedim(1, -1) * 0.5 + 0.5)).to(x)

        self.decode_first_stage = decode_first_stage
        self.encode_first_stage = encode_first_stage
        self.get_first_stage_encoding = lambda x: x


class FakeInitialModel:
    """Forge 2 / Neo before the first generation: a placeholder without forge_objects (§3)."""

    first_stage_model = None


def ldm_state(seed: int = 0, *, overflow: str | None = None) -> dict[str, torch.Tensor]:
    """A tiny VAE's weights in ldm naming (the tests' usual tiny VAE); ``overflow``: "fp16" or
    "bf16", the precision whose activations overflow (the more robust ones stay finite)."""
    from tests.webui.fakemodels import ldm_vae

    return {k: v.clone() for k, v in ldm_vae(seed, overflow=overflow).state_dict().items()}


def build_model(
    variant: Variant, *, seed: int = 0, overflow: str | None = None, dtype: torch.dtype | None = None
) -> Any:
    """The model the variant's loader would build for a tiny SD1 checkpoint."""
    state = ldm_state(seed, overflow=overflow)
    if variant.backend == "new":
        from backend.nn.vae import IntegratedAutoencoderKL
        from backend.patcher.vae import VAE

        module = IntegratedAutoencoderKL()
        module.load_state_dict(state, strict=True)
        vae = VAE(model=module, dtype=dtype)
        return (NeoEngine if variant.name == "neo" else NewEngine)(vae)
    from ldm_patched.modules.sd import VAE as OldVAE

    return OldModel(OldVAE(sd=state, dtype=dtype))


# -- Forge's modules ---------------------------------------------------------------------------
def forgeify(variant: Variant) -> None:
    """Give the fake ``modules`` the variant's decode path and Forge's extra modules."""
    import modules
    from modules import devices, processing, sd_samplers_common, shared
    from modules_forge import forge_version, main_thread

    forge_version.version = variant.version
    memory_manager(variant).reset()
    main_thread.start()

    def samples_to_images_tensor(sample, approximation=None, model=None):
        if approximation not in (None, 0):
            raise NotImplementedError("only Full decode is faked")
        return model.decode_first_stage(sample)

    def decode_first_stage(model, x):
        index = sd_samplers_common.approximation_indexes.get(shared.opts.sd_vae_decode_method, 0)
        return samples_to_images_tensor(x, index, model)

    def images_tensor_to_samples(image, approximation=None, model=None):
        model = model if model is not None else shared.sd_model
        return model.get_first_stage_encoding(model.encode_first_stage(image.to(shared.device) * 2 - 1))

    def decode_latent_batch(model, batch, target_device=None, check_for_nans=False):
        processing.core_decode_calls.append(len(batch))  # instrumentation, as in the A1111 fake
        samples = processing.DecodedSamples()
        out = decode_first_stage(model, batch)
        out = out.to(target_device) if target_device is not None else out
        for x in out:
            samples.append(x)
        return samples

    if variant.name == "neo":

        def test_for_nans(x, where):  # Neo: latents only, NaN/Inf zeroed in place
            if where == "unet":
                x.nan_to_num_(0.0, 0.0, 0.0)

        for key in ("auto_vae_precision", "auto_vae_precision_bfloat16"):
            shared.opts.data_labels.pop(key, None)
            shared.opts.data.pop(key, None)
    else:

        def test_for_nans(x, where):
            return None

    sd_samplers_common.samples_to_images_tensor = samples_to_images_tensor
    sd_samplers_common.decode_first_stage = decode_first_stage
    sd_samplers_common.images_tensor_to_samples = images_tensor_to_samples
    processing.decode_latent_batch = decode_latent_batch
    processing.images_tensor_to_samples = images_tensor_to_samples
    processing.decode_first_stage = decode_first_stage
    devices.test_for_nans = test_for_nans
    processing.core_decode_calls.clear()

    sd_models = types.ModuleType("modules.sd_models")
    sd_models.model_data = types.SimpleNamespace(sd_model=None, forge_loading_parameters={}, forge_hash="")
    sd_models.reload_calls = []
    sd_models.select_checkpoint = lambda: {"filename": "tiny.safetensors"}

    def forge_model_reload():
        data = sd_models.model_data
        if data.sd_model is not None and data.forge_hash == str(data.forge_loading_parameters):
            return data.sd_model, False
        if not data.forge_loading_parameters.get("checkpoint_info"):
            raise ValueError("Failed to find available model...")
        sd_models.reload_calls.append(1)
        data.sd_model = build_model(variant)
        data.forge_hash = str(data.forge_loading_parameters)
        shared.sd_model = data.sd_model
        return data.sd_model, True

    sd_models.forge_model_reload = forge_model_reload
    sys.modules["modules.sd_models"] = sd_models
    modules.sd_models = sd_models


def teardown() -> None:
    from modules_forge import main_thread

    main_thread.stop()
