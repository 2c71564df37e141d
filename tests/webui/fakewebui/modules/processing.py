"""processing (reference §1.1-§1.5, §4.6): the decode sites VAE Batch takes over, in the order the
webui runs them. The "sampler" is a seeded stand-in that produces latents; everything after it
(post_sample, decode, NaN handling, hires fix decode sites, infotext) follows the reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from modules import devices, lowvram, scripts, shared
from modules.sd_samplers_common import decode_first_stage, images_tensor_to_samples

core_decode_calls: list[int] = []  # test instrumentation: batch sizes the webui's own decode saw


class DecodedSamples(list):
    already_decoded = True


def decode_latent_batch(model, batch, target_device=None, check_for_nans=False):
    core_decode_calls.append(len(batch))
    samples = DecodedSamples()
    if check_for_nans:
        devices.test_for_nans(batch, "unet")
    for i in range(batch.shape[0]):
        sample = decode_first_stage(model, batch[i : i + 1])[0]
        if check_for_nans:
            try:
                devices.test_for_nans(sample, "vae")
            except devices.NansException:
                if shared.opts.auto_vae_precision_bfloat16:
                    autofix = torch.bfloat16
                elif shared.opts.auto_vae_precision:
                    autofix = torch.float32
                else:
                    raise
                if devices.dtype_vae == autofix:
                    raise
                print(
                    "A tensor with all NaNs was produced in VAE. Web UI will now convert VAE into 32-bit float and retry."
                )
                devices.dtype_vae = autofix
                model.first_stage_model.to(devices.dtype_vae)
                batch = batch.to(devices.dtype_vae)
                sample = decode_first_stage(model, batch[i : i + 1])[0]
        if target_device is not None:
            sample = sample.to(target_device)
        samples.append(sample)
    return samples


def create_infotext(p, index=0):
    params = {
        "Steps": p.steps,
        "Seed": p.all_seeds[index],
        "Size": f"{p.width}x{p.height}",
        **p.extra_generation_params,
    }
    out = {}
    for k, v in params.items():
        if isinstance(v, list):
            v = v[index]
        elif callable(v):
            v = v(p=p, index=index)
        out[k] = v
    # infotext_utils.quote: values holding ",", ":" or a newline are JSON-quoted (reference §4.6)
    text = ", ".join(f"{k}: {_quote(v)}" for k, v in out.items() if v is not None)
    return f"{p.prompt}\n{text}"


def _quote(value):
    import json

    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


class Processed:
    def __init__(self, p, images, infotexts):
        self.images, self.infotexts, self.index_of_first_image = images, infotexts, 0
        self.extra_generation_params = p.extra_generation_params


class StableDiffusionProcessing:
    def __init__(self, *, prompt="x", seed=1, batch_size=1, n_iter=1, width=64, height=64, steps=2,
                 scripts_runner=None, script_args=(), unet_nan=None, outpath_samples=""):  # fmt: skip
        self.prompt, self.seed, self.batch_size, self.n_iter = prompt, seed, batch_size, n_iter
        self.width, self.height, self.steps = width, height, steps
        self.scripts, self.script_args = scripts_runner, tuple(script_args)
        self.extra_generation_params = {}
        self.unet_nan = unet_nan  # (iteration, sample, channel, y, x): a NaN in the "UNet output" there
        self.outpath_samples = outpath_samples
        self.iteration = 0
        self.enable_hr = False

    @property
    def sd_model(self):
        return shared.sd_model  # §7.11: the model current at decode time

    def init(self, all_prompts, all_seeds, all_subseeds):
        pass

    def sample_latents(self, seeds, *, size=None):
        c = getattr(shared.sd_model, "latent_channels", 4)
        h, w = size or (self.height // 8, self.width // 8)
        out = torch.stack([torch.randn(c, h, w, generator=torch.Generator().manual_seed(s)) for s in seeds])
        if self.unet_nan is not None and self.unet_nan[0] == self.iteration:
            out[self.unet_nan[1:]] = float("nan")
        return out


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    def __init__(self, *, enable_hr=False, hr_upscaler="Latent", hr_scale=2.0, **kw):
        super().__init__(**kw)
        self.enable_hr, self.hr_upscaler, self.hr_scale = enable_hr, hr_upscaler, hr_scale

    def sample(self, conditioning=None, unconditional_conditioning=None, seeds=None, subseeds=None,
               subseed_strength=None, prompts=None):  # fmt: skip
        samples = self.sample_latents(seeds)
        if not self.enable_hr:
            return samples
        if self.hr_upscaler.startswith("Latent"):
            decoded_samples = None
        else:
            decoded_samples = torch.stack(
                decode_latent_batch(self.sd_model, samples, target_device=devices.cpu, check_for_nans=True)
            ).to(dtype=torch.float32)
        return self.sample_hr_pass(samples, decoded_samples, seeds, subseeds, subseed_strength, prompts)

    def sample_hr_pass(self, samples, decoded_samples, seeds, subseeds, subseed_strength, prompts):
        if shared.state.interrupted:
            return samples
        if decoded_samples is None:
            samples = F.interpolate(samples, scale_factor=self.hr_scale, mode="bilinear")
        else:
            images = torch.clamp((decoded_samples + 1.0) / 2.0, 0.0, 1.0)
            images = F.interpolate(images, scale_factor=self.hr_scale, mode="bilinear")
            samples = images_tensor_to_samples(images.to(shared.device, devices.dtype_vae), 0)
        shared.state.nextjob()
        if self.scripts is not None:
            self.scripts.before_hr(self)
        samples = samples * 0.9 + 0.1 * self.sample_latents(seeds, size=samples.shape[-2:])  # "second pass"
        return decode_latent_batch(self.sd_model, samples, target_device=devices.cpu, check_for_nans=True)


class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    def __init__(self, *, init_images=(), denoising_strength=0.5, **kw):
        super().__init__(**kw)
        self.init_images, self.denoising_strength = list(init_images), denoising_strength
        self.init_latent = None

    def init(self, all_prompts, all_seeds, all_subseeds):
        batch = torch.stack([im for im in self.init_images] * self.batch_size)[: self.batch_size]
        image = batch.to(shared.device, dtype=devices.dtype_vae)
        self.init_latent = images_tensor_to_samples(image, 0, self.sd_model)

    def sample(self, conditioning=None, unconditional_conditioning=None, seeds=None, subseeds=None,
               subseed_strength=None, prompts=None):  # fmt: skip
        noise = self.sample_latents(seeds)
        return self.init_latent.float() * (1 - self.denoising_strength) + noise * self.denoising_strength


def process_images(p):
    """process_images + process_images_inner, reduced to the hook and decode order of §1.1 / §2.3."""
    if p.scripts is not None:
        p.scripts.before_process(p)
    p.all_seeds = [p.seed + i for i in range(p.batch_size * p.n_iter)]
    p.all_prompts = [p.prompt] * len(p.all_seeds)
    if p.scripts is not None:
        p.scripts.process(p)
    infotexts, output_images = [], []
    with torch.no_grad():
        with devices.autocast():
            p.init(p.all_prompts, p.all_seeds, [])
        state = shared.state
        if state.job_count == -1:
            state.job_count = p.n_iter
        for n in range(p.n_iter):
            p.iteration = n
            if state.skipped:
                state.skipped = False
            if state.interrupted or state.stopping_generation:
                break
            p.seeds = p.all_seeds[n * p.batch_size : (n + 1) * p.batch_size]
            if p.scripts is not None:
                p.scripts.process_batch(p, batch_number=n, prompts=p.all_prompts, seeds=p.seeds, subseeds=[])
            with devices.autocast():
                samples_ddim = p.sample(conditioning=None, unconditional_conditioning=None, seeds=p.seeds,
                                        subseeds=[], subseed_strength=0, prompts=p.all_prompts)  # fmt: skip
            if p.scripts is not None:
                ps = scripts.PostSampleArgs(samples_ddim)
                p.scripts.post_sample(p, ps)
                samples_ddim = ps.samples
            if getattr(samples_ddim, "already_decoded", False):
                x_samples_ddim = samples_ddim
            else:
                devices.test_for_nans(samples_ddim, "unet")
                if shared.opts.sd_vae_decode_method != "Full":
                    p.extra_generation_params["VAE Decoder"] = shared.opts.sd_vae_decode_method
                x_samples_ddim = decode_latent_batch(
                    p.sd_model, samples_ddim, target_device=devices.cpu, check_for_nans=True
                )
            x_samples_ddim = torch.stack(x_samples_ddim).float()
            x_samples_ddim = torch.clamp((x_samples_ddim + 1.0) / 2.0, min=0.0, max=1.0)
            if lowvram.is_enabled(shared.sd_model):
                lowvram.send_everything_to_cpu()
            state.nextjob()
            if p.scripts is not None:
                p.scripts.postprocess_batch(p, x_samples_ddim, batch_number=n)
            for i, x_sample in enumerate(x_samples_ddim):
                infotexts.append(_infotext(p, i))
                output_images.append(x_sample)
    res = Processed(p, output_images, infotexts)
    if p.scripts is not None:
        p.scripts.postprocess(p, res)
    return res


def _infotext(p, i):
    # as the webui: per-image infotext right after the batch decode, position in the batch as index
    saved = p.all_seeds
    p.all_seeds = p.seeds
    try:
        return create_infotext(p, index=i)
    finally:
        p.all_seeds = saved
