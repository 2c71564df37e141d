"""sd_samplers_common (reference §1.6)."""

from __future__ import annotations

import torch

from modules import devices, shared

approximation_indexes = {"Full": 0, "Approx NN": 1, "Approx cheap": 2, "TAESD": 3}


def samples_to_images_tensor(sample, approximation=None, model=None):
    if approximation not in (None, 0):
        raise NotImplementedError("only Full decode is faked")
    with torch.no_grad(), devices.without_autocast():
        fsm = model.first_stage_model  # None on Forge, which casts nothing here (§8)
        return model.decode_first_stage(sample.to(fsm.dtype) if fsm is not None else sample)


def decode_first_stage(model, x):
    x = x.to(devices.dtype_vae)
    approx_index = approximation_indexes.get(shared.opts.sd_vae_decode_method, 0)
    return samples_to_images_tensor(x, approx_index, model)


def images_tensor_to_samples(image, approximation=None, model=None):
    if model is None:
        model = shared.sd_model
    model.first_stage_model.to(devices.dtype_vae)
    image = image.to(shared.device, dtype=devices.dtype_vae) * 2 - 1
    if len(image) > 1:
        return torch.stack(
            [
                model.get_first_stage_encoding(model.encode_first_stage(torch.unsqueeze(img, 0)))[0]
                for img in image
            ]
        )
    return model.get_first_stage_encoding(model.encode_first_stage(image))
