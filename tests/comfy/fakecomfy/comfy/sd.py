"""comfy/sd.py's ``VAE`` (reference §2.1-2.4, snapshot :274-853) for image VAEs in ldm naming."""

from __future__ import annotations

import logging
import re

import torch

from comfy import model_management
from comfy.ldm.models.autoencoder import AutoencoderKL, AutoencodingEngine
from comfy.model_patcher import ModelPatcher
from tests.forge.threepass import three_pass


def _widths(sd):
    widths = []
    while (w := sd.get(f"encoder.down.{len(widths)}.block.0.conv2.weight")) is not None:
        widths.append(int(w.shape[0]))
    return widths


def _layers(sd):
    return len({m.group(1) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})


class VAE:
    def __init__(self, sd=None, device=None, config=None, dtype=None, metadata=None):
        self.memory_used_encode = lambda shape, dtype: (
            (1767 * shape[2] * shape[3]) * model_management.dtype_size(dtype)
        )
        self.memory_used_decode = lambda shape, dtype: (2178 * shape[2] * shape[3] * 64) * model_management.dtype_size(dtype)  # fmt: skip
        self.downscale_ratio = 8
        self.upscale_ratio = 8
        self.latent_channels = 4
        self.output_channels = 3
        self.latent_dim = 2
        self.process_input = lambda image: image * 2.0 - 1.0
        self.process_output = lambda image: torch.clamp((image + 1.0) / 2.0, min=0.0, max=1.0)
        self.working_dtypes = [torch.bfloat16, torch.float32]
        self.disable_offload = False
        self.not_video = False
        self.crop_input = True
        self.extra_1d_channel = None
        self.first_stage_model = None
        widths = _widths(sd or {})
        if widths and "decoder.conv_in.weight" in sd:
            z = int(sd["decoder.conv_in.weight"].shape[1])
            cls = AutoencoderKL if "post_quant_conv.weight" in sd else AutoencodingEngine
            self.latent_channels = z
            self.first_stage_model = cls(widths, _layers(sd), z).eval()
            missing, _unexpected = self.first_stage_model.load_state_dict(sd, strict=False)
            if missing:
                logging.warning("Missing VAE keys %s", missing)
        else:
            logging.warning("WARNING: No VAE weights detected, VAE not initalized.")
            return
        self.device = device or model_management.vae_device()
        offload = model_management.vae_offload_device()
        self.vae_dtype = dtype or model_management.vae_dtype(self.device, self.working_dtypes)
        self.first_stage_model.to(self.vae_dtype)  # :588, in place: the file's precision is gone
        self.output_device = model_management.intermediate_device()
        self.patcher = ModelPatcher(self.first_stage_model, load_device=self.device, offload_device=offload)

    def throw_exception_if_invalid(self):
        if self.first_stage_model is None:
            raise RuntimeError(
                "ERROR: VAE is invalid: None\n\nIf the VAE is from a checkpoint loader node your checkpoint does not contain a valid VAE."
            )

    def spacial_compression_decode(self):
        return self.upscale_ratio

    def spacial_compression_encode(self):
        return self.downscale_ratio

    def vae_encode_crop_pixels(self, pixels):
        if not self.crop_input:
            return pixels
        ratio = self.spacial_compression_encode()
        dims = pixels.shape[1:-1]
        for d in range(len(dims)):
            x = (dims[d] // ratio) * ratio
            x_offset = (dims[d] % ratio) // 2
            if x != dims[d]:
                pixels = pixels.narrow(d + 1, x_offset, x)
        return pixels

    def decode_tiled_(self, samples, tile_x=64, tile_y=64, overlap=16):
        fn = lambda a: self.first_stage_model.decode(a.to(self.vae_dtype).to(self.device)).float() + 1.0
        return three_pass(samples, fn, self.upscale_ratio, tile_x, tile_y, overlap)

    def decode(self, samples_in, vae_options={}):
        self.throw_exception_if_invalid()
        pixel_samples = None
        do_tile = False
        try:
            memory_used = self.memory_used_decode(samples_in.shape, self.vae_dtype)
            model_management.load_models_gpu([self.patcher], memory_required=memory_used,
                                             force_full_load=self.disable_offload)  # fmt: skip
            free_memory = model_management.get_free_memory(self.device)
            batch_number = max(1, int(free_memory / memory_used))
            for x in range(0, samples_in.shape[0], batch_number):
                samples = samples_in[x : x + batch_number].to(self.vae_dtype).to(self.device)
                out = self.process_output(
                    self.first_stage_model.decode(samples, **vae_options).to(self.output_device).float()
                )
                if pixel_samples is None:
                    pixel_samples = torch.empty(
                        (samples_in.shape[0], *out.shape[1:]), device=self.output_device
                    )
                pixel_samples[x : x + batch_number] = out
        except model_management.OOM_EXCEPTION:
            logging.warning(
                "Warning: Ran out of memory when regular VAE decoding, retrying with tiled VAE decoding."
            )
            do_tile = True
        if do_tile:  # the whole batch again, chunks already done thrown away
            pixel_samples = self.decode_tiled_(samples_in)
        return pixel_samples.to(self.output_device).movedim(1, -1)

    def decode_tiled(self, samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        self.throw_exception_if_invalid()
        memory_used = self.memory_used_decode(samples.shape, self.vae_dtype)  # the untiled estimate (#TODO)
        model_management.load_models_gpu([self.patcher], memory_required=memory_used)
        args = {
            k: v for k, v in (("tile_x", tile_x), ("tile_y", tile_y), ("overlap", overlap)) if v is not None
        }
        return self.decode_tiled_(samples, **args).movedim(1, -1)

    def encode_tiled_(self, pixel_samples, tile_x=512, tile_y=512, overlap=64):
        raise NotImplementedError("the fake ComfyUI has no tiled encode (the pack never relies on it)")

    def encode(self, pixel_samples):
        self.throw_exception_if_invalid()
        pixel_samples = self.vae_encode_crop_pixels(pixel_samples)
        pixel_samples = pixel_samples.movedim(-1, 1)
        do_tile = False
        samples = None
        try:
            memory_used = self.memory_used_encode(pixel_samples.shape, self.vae_dtype)
            model_management.load_models_gpu([self.patcher], memory_required=memory_used,
                                             force_full_load=self.disable_offload)  # fmt: skip
            free_memory = model_management.get_free_memory(self.device)
            batch_number = max(1, int(free_memory / max(1, memory_used)))
            for x in range(0, pixel_samples.shape[0], batch_number):
                pixels_in = (
                    self.process_input(pixel_samples[x : x + batch_number]).to(self.vae_dtype).to(self.device)
                )
                out = self.first_stage_model.encode(pixels_in).to(self.output_device).float()
                if samples is None:
                    samples = torch.empty((pixel_samples.shape[0], *out.shape[1:]), device=self.output_device)
                samples[x : x + batch_number] = out
        except model_management.OOM_EXCEPTION:
            logging.warning(
                "Warning: Ran out of memory when regular VAE encoding, retrying with tiled VAE encoding."
            )
            do_tile = True
        if do_tile:
            samples = self.encode_tiled_(pixel_samples)
        return samples
