"""comfy/model_management.py (reference §2.6), on the CPU, with test seams: free memory set by the
tests, calls recorded."""

from __future__ import annotations

import threading

import torch

OOM_EXCEPTION = torch.cuda.OutOfMemoryError  # :249-252

free_bytes = 64 << 30
calls: list[tuple] = []
_vae_dtype = torch.float32


def reset() -> None:
    global free_bytes, _vae_dtype, interrupt_processing
    free_bytes = 64 << 30
    _vae_dtype = torch.float32
    interrupt_processing = False
    calls.clear()


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


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False):  # fmt: skip
    calls.append(("load", list(models), memory_required, force_full_load))
    for m in models:
        m.model.to(m.load_device)


def load_model_gpu(model):
    return load_models_gpu([model])


def soft_empty_cache(force=False):
    calls.append(("empty",))


# -- interrupt (:1405-1429) -------------------------------------------------------------------------
class InterruptProcessingException(Exception):
    pass


interrupt_processing_mutex = threading.RLock()
interrupt_processing = False


def interrupt_current_processing(value=True):
    global interrupt_processing
    with interrupt_processing_mutex:
        interrupt_processing = value


def processing_interrupted():
    with interrupt_processing_mutex:
        return interrupt_processing


def throw_exception_if_processing_interrupted():
    global interrupt_processing
    with interrupt_processing_mutex:
        if interrupt_processing:
            interrupt_processing = False
            raise InterruptProcessingException()
