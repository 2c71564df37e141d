"""Devices, dtypes, free memory and out-of-memory detection: shared by the backends and the engine
(so it sits below both)."""

from __future__ import annotations

import functools
import gc
import os
import sys

import torch

_DTYPE_NAMES = {
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "fp64": torch.float64,
    "float64": torch.float64,
}

# How much range and precision a dtype has, for the recovery ladder: only rungs above the
# current dtype are tried (a fp32 VAE is never "recovered" down to bf16).
_ROBUSTNESS = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bf16"``, ``"float16"``, ``torch.float32``... to a torch dtype (clear error otherwise)."""
    if isinstance(name, torch.dtype):
        if name not in _ROBUSTNESS:
            raise ValueError(f"unsupported VAE dtype {name}")
        return name
    key = str(name).strip().lower().removeprefix("torch.")
    try:
        return _DTYPE_NAMES[key]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use fp16, bf16 or fp32") from None


def dtype_name(dtype: torch.dtype) -> str:
    """Short name used in messages and infotext: fp16, bf16, fp32, fp64."""
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}.get(
        dtype, str(dtype).removeprefix("torch.")
    )


def robustness(dtype: torch.dtype) -> int:
    return _ROBUSTNESS.get(dtype, -1)


def resolve_device(spec: str | torch.device | None = None) -> torch.device:
    """``auto``/None picks CUDA, then MPS, then CPU."""
    if isinstance(spec, torch.device):
        return spec
    if spec is None or str(spec).strip().lower() in ("", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(str(spec).strip())
    except RuntimeError:  # torch's own message lists every device type it knows
        raise ValueError(f"unknown device {spec!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the device has it natively (Ampere+), fp16 on other GPUs, fp32 on CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if dtype_supported(device, torch.bfloat16) else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def dtype_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``dtype`` runs natively on ``device`` (bf16 needs compute capability 8 on CUDA).

    On other devices the answer comes from running the VAE's kernels once on a tiny input (cached):
    torch 2.1, which A1111 1.10.1 ships, has no fp16 convolution, GroupNorm or upsampling on the CPU
    (``"slow_conv2d_cpu" not implemented for 'Half'``), later releases do; bf16 on MPS depends on the
    release and the macOS version."""
    if dtype not in _ROBUSTNESS:
        return False
    if device.type == "cuda":
        if dtype == torch.bfloat16:
            return torch.cuda.get_device_capability(device)[0] >= 8
        return True
    if dtype in (torch.float32, torch.float64) and device.type == "cpu":
        return True
    return _runs_vae_kernels(str(device), dtype)


@functools.cache
def _runs_vae_kernels(device: str, dtype: torch.dtype) -> bool:
    """Try the ops an AutoencoderKL is made of (conv, GroupNorm, SiLU, nearest upsampling, the
    attention's matmul and softmax) in ``dtype`` on ``device``."""
    import torch.nn.functional as F

    try:
        x = torch.ones(1, 4, 4, 4, device=device, dtype=dtype)
        w = torch.ones(4, 4, 3, 3, device=device, dtype=dtype)
        h = F.silu(F.group_norm(F.conv2d(x, w, padding=1), 2))
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        q = h.flatten(2).transpose(1, 2)
        out = torch.bmm(q.transpose(1, 2), q).softmax(dim=-1)
        return bool(torch.isfinite(out).all())
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _cgroup_free() -> int | None:
    """Room left under a cgroup v2/v1 memory limit, when one is set."""
    for limit_path, usage_path in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            with open(limit_path) as f:
                raw = f.read().strip()
            if raw == "max":
                return None
            limit = int(raw)
            if limit >= 1 << 60:  # v1 reports "unlimited" as a huge number
                return None
            with open(usage_path) as f:
                usage = int(f.read().strip())
            return max(0, limit - usage)
        except (OSError, ValueError):
            continue
    return None


#: Address space a process maps beyond the memory it touches (allocator arenas, oneDNN's kernel
#: cache): kept out of what an address-space limit leaves for a decode.
ADDRESS_SPACE_RESERVE = 32 << 20


def _address_space_left() -> int | None:
    """Bytes of address space this process may still map under ``RLIMIT_AS``, less
    :data:`ADDRESS_SPACE_RESERVE` (None: no limit)."""
    try:
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY or soft < 0:
            return None
        with open("/proc/self/status") as f:
            size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        return max(0, soft - size - ADDRESS_SPACE_RESERVE)
    except (ImportError, OSError, StopIteration, ValueError):
        return None


def _available_ram() -> int:
    """Available system RAM in bytes (Linux MemAvailable; other systems best effort)."""
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        avail = int(line.split()[1]) * 1024
                        limits = [v for v in (_cgroup_free(), _address_space_left()) if v is not None]
                        return min([avail, *limits])
        except (OSError, ValueError):
            pass
    if sys.platform == "win32":
        import ctypes

        class _MemStatus(ctypes.Structure):
            _fields_ = [
                ("dwLength", ctypes.c_ulong),
                ("dwMemoryLoad", ctypes.c_ulong),
                ("ullTotalPhys", ctypes.c_ulonglong),
                ("ullAvailPhys", ctypes.c_ulonglong),
                ("ullTotalPageFile", ctypes.c_ulonglong),
                ("ullAvailPageFile", ctypes.c_ulonglong),
                ("ullTotalVirtual", ctypes.c_ulonglong),
                ("ullAvailVirtual", ctypes.c_ulonglong),
                ("sullAvailExtendedVirtual", ctypes.c_ulonglong),
            ]

        stat = _MemStatus()
        stat.dwLength = ctypes.sizeof(_MemStatus)
        if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(stat)):  # type: ignore[attr-defined]
            return int(stat.ullAvailPhys)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 << 30  # unknown: assume a modest 4 GiB


def free_memory(device: torch.device) -> int:
    """Bytes a decode can use now on ``device``.

    CUDA: the driver's free memory plus what PyTorch's caching allocator holds reserved but unused.
    CPU: available RAM (bounded by a cgroup limit when one applies). MPS: the recommended working set
    minus what is allocated.
    """
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        stats = torch.cuda.memory_stats(device)
        reserved = stats.get("reserved_bytes.all.current", 0)
        active = stats.get("active_bytes.all.current", 0)
        return int(free + max(0, reserved - active))
    if device.type == "mps":
        mps = getattr(torch, "mps", None)
        try:
            return int(mps.recommended_max_memory() - mps.driver_allocated_memory())  # type: ignore[union-attr]
        except (AttributeError, RuntimeError):
            return _available_ram()
    return _available_ram()


def empty_cache(device: torch.device) -> None:
    """Give cached blocks back after an OOM (after the exception is gone, so its frames are freed)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        mps = getattr(torch, "mps", None)
        if mps is not None and hasattr(mps, "empty_cache"):
            mps.empty_cache()


_OOM_TYPES: tuple[type[BaseException], ...] = (
    *(
        t
        for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
        if isinstance(t, type)
    ),
    MemoryError,
)

#: oneDNN reports an allocation that failed while building a convolution as "could not create a
#: primitive" (seen under RLIMIT_AS on the CPU); C++ allocations as std::bad_alloc.
_OOM_MESSAGES = (
    "out of memory",
    "can't allocate memory",
    "not enough memory",
    "failed to allocate",
    "could not create a primitive",
    "bad_alloc",
)


def is_oom(exc: BaseException) -> bool:
    """True for CUDA/MPS/CPU allocation failures, whatever exception type the backend raised."""
    if isinstance(exc, _OOM_TYPES):
        return True
    if isinstance(exc, RuntimeError):
        msg = str(exc).lower()
        return any(m in msg for m in _OOM_MESSAGES)
    return False
