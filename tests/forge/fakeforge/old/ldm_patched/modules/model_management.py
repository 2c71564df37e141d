"""ldm_patched/modules/model_management.py of Classic / reForge (reference §1.3), on the CPU; the
same test seams as the new backend's fake (free memory set by tests, calls recorded)."""

from __future__ import annotations

import torch

OOM_EXCEPTION = torch.cuda.OutOfMemoryError
VAE_ALWAYS_TILED = False

free_bytes = 64 << 30
calls: list[tuple] = []
_vae_dtype = torch.float32


def reset():
    global free_bytes, _vae_dtype
    free_bytes = 64 << 30
    _vae_dtype = torch.float32
    calls.clear()


def dtype_size(dtype):
    return torch.empty((), dtype=dtype).element_size()


def vae_device():
    return torch.device("cpu")


def vae_offload_device():
    return torch.device("cpu")


def intermediate_device():
    return torch.device("cpu")


def vae_dtype():
    return _vae_dtype


def get_free_memory(dev=None, torch_free_too=False):
    return free_bytes


def load_models_gpu(models, memory_required=0):
    calls.append(("load", list(models), memory_required))
    for m in models:
        m.model.to(m.load_device)


def load_model_gpu(model):
    return load_models_gpu([model])


def soft_empty_cache(force=False):
    calls.append(("empty",))


def unload_model_clones(model):
    calls.append(("unload_clones",))
