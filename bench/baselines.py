"""Baselines the engine is measured and tested against."""

from __future__ import annotations

import torch

from lib_vaebatch.backends.base import VAEBackend


def a1111_decode_latent_batch(
    backend: VAEBackend,
    batch: torch.Tensor,
    target_device: torch.device | str | None = "cpu",
    check_for_nans: bool = True,
    *,
    auto_vae_precision_bfloat16: bool = False,
    auto_vae_precision: bool = True,
) -> list[torch.Tensor]:
    """A faithful re-implementation of A1111 1.10.1 ``modules/processing.py: decode_latent_batch``
    (see shared/docs/webui-reference.md §1.2) over one of our backends: one sample at a time,
    ``decode_first_stage`` (cast to the VAE dtype, then ``1/scale * z``), a NaN test of the first
    element only, a permanent switch of precision on NaN, and a move to ``target_device``."""
    samples = []
    for i in range(batch.shape[0]):
        sample = _decode_first_stage(backend, batch[i : i + 1])[0]
        if check_for_nans and torch.isnan(sample[(0,) * sample.ndim]):
            if auto_vae_precision_bfloat16:
                fix = torch.bfloat16
            elif auto_vae_precision:
                fix = torch.float32
            else:
                raise FloatingPointError("A tensor with all NaNs was produced in VAE.")
            if backend.dtype == fix:
                raise FloatingPointError("A tensor with all NaNs was produced in VAE.")
            backend.set_dtype(fix)
            sample = _decode_first_stage(backend, batch[i : i + 1])[0]
        if target_device is not None:
            sample = sample.to(target_device)
        samples.append(sample)
    return samples


def _decode_first_stage(backend: VAEBackend, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        z = x.to(backend.device, backend.dtype)
        z = 1.0 / backend.scaling_factor * z
        if backend.shift_factor:
            z = z + backend.shift_factor
        return backend.decode(z)
