"""backend/memory_management.py of Forge 2 / Neo (reference §1.1, §1.2, §2), on the CPU: models
are "loaded" by moving their patcher's module to the load device; free memory is a number the
tests set (the fake's VRAM). Calls are recorded for the tests."""

from __future__ import annotations

import torch

OOM_EXCEPTION = torch.cuda.OutOfMemoryError
VAE_ALWAYS_TILED = False

free_bytes = 64 << 30  # what get_free_memory answers (tests lower it)
calls: list[tuple] = []  # ("load", [patchers], memory_required) / ("free",) / ("empty",)
loaded: list = []
_vae_dtype = torch.float32


def reset():
    global free_bytes, _vae_dtype, VAE_ALWAYS_TILED
    free_bytes = 64 << 30
    _vae_dtype = torch.float32
    VAE_ALWAYS_TILED = False
    calls.clear()
    loaded.clear()


def dtype_size(dtype):
    return torch.empty((), dtype=dtype).element_size()


def vae_device():
    return torch.device("cpu")


def vae_offload_device():
    return torch.device("cpu")


def intermediate_device():
    return torch.device("cpu")


def vae_dtype(device=None, allowed_dtypes=()):
    return _vae_dtype


def get_free_memory(dev=None, torch_free_too=False):
    return free_bytes


def load_models_gpu(models, memory_required=0, hard_memory_preservation=0, **kwargs):
    calls.append(("load", list(models), memory_required))
    for m in models:
        m.model.to(m.load_device)
        if m not in loaded:
            loaded.append(m)


def load_model_gpu(model):
    return load_models_gpu([model])


def free_memory(memory_required, device, keep_loaded=()):
    calls.append(("free", memory_required))


def unload_model_clones(model):
    calls.append(("unload_clones",))


def soft_empty_cache(force=False):
    calls.append(("empty",))


def unload_all_models():
    calls.append(("unload_all",))
    loaded.clear()
