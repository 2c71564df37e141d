"""ldm_patched/modules/sd.py VAE of Classic (reference §1.3): built from a state dict (the default
architecture, here the tests' tiny one; diffusers keys converted), chunked decode by free memory
with the whole-batch 3-pass tiled fallback on out-of-memory, and the decode wrapper hook."""

from __future__ import annotations

import torch

from ldm_patched.ldm.models.autoencoder import AutoencoderKL
from ldm_patched.modules import model_management
from tests.forge.threepass import three_pass

calls: list[str] = []


class ModelPatcher:
    def __init__(self, model, load_device, offload_device):
        self.model, self.load_device, self.offload_device = model, load_device, offload_device
        self.model_options = {}


class VAE:
    def __init__(self, sd=None, device=None, config=None, dtype=None, no_init=False):
        if no_init:
            return
        if "decoder.up_blocks.0.resnets.0.norm1.weight" in sd:
            from lib_vaebatch.backends.keys import diffusers_to_ldm

            sd = diffusers_to_ldm(sd)
        self.memory_used_encode = lambda shape, dtype: (
            (1767 * shape[2] * shape[3]) * model_management.dtype_size(dtype)
        )
        self.memory_used_decode = lambda shape, dtype: (
            (2178 * shape[2] * shape[3] * 64) * model_management.dtype_size(dtype)
        )
        self.downscale_ratio = 8
        self.latent_channels = 4
        self.first_stage_model = AutoencoderKL().eval()
        missing, _unexpected = self.first_stage_model.load_state_dict(sd, strict=False)
        if missing:
            print("Missing VAE keys", missing)
        self.device = device or model_management.vae_device()
        self.vae_dtype = dtype or model_management.vae_dtype()
        print("VAE dtype:", self.vae_dtype)
        self.first_stage_model.to(self.vae_dtype)
        self.output_device = model_management.intermediate_device()
        self.patcher = ModelPatcher(
            self.first_stage_model, self.device, model_management.vae_offload_device()
        )

    def decode_tiled_(self, samples, tile_x=64, tile_y=64, overlap=16):
        calls.append("tiled")
        fn = lambda a: self.first_stage_model.decode(a.to(self.vae_dtype).to(self.device)) + 1.0  # noqa: E731
        return three_pass(samples, fn, self.downscale_ratio, tile_x, tile_y, overlap)

    def decode_inner(self, samples_in):
        calls.append("decode")
        try:
            memory_used = self.memory_used_decode(samples_in.shape, self.vae_dtype)
            model_management.load_models_gpu([self.patcher], memory_required=memory_used)
            free = model_management.get_free_memory(self.device)
            batch_number = max(1, int(free / memory_used))
            pixel_samples = torch.empty(
                (samples_in.shape[0], 3, samples_in.shape[2] * 8, samples_in.shape[3] * 8)
            )
            for x in range(0, samples_in.shape[0], batch_number):
                samples = samples_in[x : x + batch_number].to(self.vae_dtype).to(self.device)
                out = self.first_stage_model.decode(samples).to(self.output_device).float()
                pixel_samples[x : x + batch_number] = torch.clamp((out + 1.0) / 2.0, 0.0, 1.0)
        except model_management.OOM_EXCEPTION:
            print("Warning: Ran out of memory when regular VAE decoding, retrying with tiled VAE decoding.")
            pixel_samples = self.decode_tiled_(samples_in)
        return pixel_samples.to(self.output_device).movedim(1, -1)

    def decode(self, samples_in):
        wrapper = self.patcher.model_options.get("model_vae_decode_wrapper", None)
        return self.decode_inner(samples_in) if wrapper is None else wrapper(self.decode_inner, samples_in)

    def decode_tiled(self, samples, tile_x=64, tile_y=64, overlap=16):
        model_management.load_model_gpu(self.patcher)
        return self.decode_tiled_(samples, tile_x, tile_y, overlap).movedim(1, -1)

    def encode(self, pixel_samples):
        calls.append("encode")
        pixel_samples = pixel_samples.movedim(-1, 1)
        memory_used = self.memory_used_encode(pixel_samples.shape, self.vae_dtype)
        model_management.load_models_gpu([self.patcher], memory_required=memory_used)
        x = (2.0 * pixel_samples - 1.0).to(self.vae_dtype).to(self.device)
        return self.first_stage_model.encode(x).to(self.output_device).float()
