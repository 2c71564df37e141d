"""backend/patcher/vae.py of Forge 2 / Neo (reference §1.1 items 5-6, §1.2): ``VAE.decode`` loads
the VAE through the memory manager with a per-sample estimate, chunks by free memory, clamps to
[0, 1] NHWC, and on out-of-memory re-decodes the WHOLE batch with ComfyUI's 3 averaged tiled
passes (tests/forge/threepass.py: our own small version of that method, not Forge's code)."""

from __future__ import annotations

import torch

from backend import memory_management
from backend.patcher.base import ModelPatcher
from tests.forge.threepass import three_pass

calls: list[str] = []  # test instrumentation: "decode", "tiled", "encode"


class VAE:
    def __init__(self, model=None, device=None, dtype=None, no_init=False):
        if no_init:
            return
        self.memory_used_encode = lambda shape, dtype: (
            (1767 * shape[2] * shape[3]) * memory_management.dtype_size(dtype)
        )
        self.memory_used_decode = lambda shape, dtype: (
            (2178 * shape[2] * shape[3] * 64) * memory_management.dtype_size(dtype)
        )
        self.downscale_ratio = int(2 ** (len(model.config.down_block_types) - 1))
        self.latent_channels = int(model.config.latent_channels)
        self.first_stage_model = model.eval()
        self.device = device or memory_management.vae_device()
        self.vae_dtype = dtype or memory_management.vae_dtype()
        self.first_stage_model.to(self.vae_dtype)
        self.output_device = memory_management.intermediate_device()
        self.patcher = ModelPatcher(
            self.first_stage_model, self.device, memory_management.vae_offload_device()
        )

    def decode_tiled_(self, samples, tile_x=64, tile_y=64, overlap=16):
        calls.append("tiled")
        fn = lambda a: self.first_stage_model.decode(a.to(self.vae_dtype).to(self.device)) + 1.0  # noqa: E731
        return three_pass(samples, fn, self.downscale_ratio, tile_x, tile_y, overlap)

    def decode_inner(self, samples_in):
        calls.append("decode")
        if memory_management.VAE_ALWAYS_TILED:
            return self.decode_tiled(samples_in).to(self.output_device)
        try:
            memory_used = self.memory_used_decode(samples_in.shape, self.vae_dtype)
            memory_management.load_models_gpu([self.patcher], memory_required=memory_used)
            free = memory_management.get_free_memory(self.device)
            batch_number = max(1, int(free / memory_used))
            pixel_samples = torch.empty(
                (
                    samples_in.shape[0],
                    3,
                    samples_in.shape[2] * self.downscale_ratio,
                    samples_in.shape[3] * self.downscale_ratio,
                )
            )
            for x in range(0, samples_in.shape[0], batch_number):
                samples = samples_in[x : x + batch_number].to(self.vae_dtype).to(self.device)
                out = self.first_stage_model.decode(samples).to(self.output_device).float()
                pixel_samples[x : x + batch_number] = torch.clamp((out + 1.0) / 2.0, 0.0, 1.0)
        except memory_management.OOM_EXCEPTION:
            print("Warning: Ran out of memory when regular VAE decoding, retrying with tiled VAE decoding.")
            pixel_samples = self.decode_tiled_(samples_in)
        return pixel_samples.to(self.output_device).movedim(1, -1)

    def decode(self, samples_in):
        wrapper = self.patcher.model_options.get("model_vae_decode_wrapper", None)
        return self.decode_inner(samples_in) if wrapper is None else wrapper(self.decode_inner, samples_in)

    def decode_tiled(self, samples, tile_x=64, tile_y=64, overlap=16):
        memory_management.load_model_gpu(self.patcher)
        return self.decode_tiled_(samples, tile_x, tile_y, overlap).movedim(1, -1)

    def encode(self, pixel_samples):
        """NHWC in [0, 1] to raw latents; SAMPLES the posterior (Forge 2 / Neo)."""
        calls.append("encode")
        pixel_samples = pixel_samples.movedim(-1, 1)
        memory_used = self.memory_used_encode(pixel_samples.shape, self.vae_dtype)
        memory_management.load_models_gpu([self.patcher], memory_required=memory_used)
        x = (2.0 * pixel_samples - 1.0).to(self.vae_dtype).to(self.device)
        return self.first_stage_model.encode(x).to(self.output_device).float()
