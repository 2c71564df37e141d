"""Shared helpers for the benchmarks: machine description, timing, SD-architecture VAEs, output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    flags: list[str] = []
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), cpu)
        have = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
        flags = [x for x in have if x.startswith(("avx", "amx", "fma"))]  # recorded, never decided on
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_vector_flags": flags,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": load_average(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (None where the system has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def sd_vae(latent_channels: int = 4, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """An SD-architecture AutoencoderKL (128, 256, 512, 512; random weights) as our backend."""
    import diffusers
    from diffusers import AutoencoderKL

    from lib_vaebatch.backends.diffusers_vae import DiffusersVAE, family_config
    from lib_vaebatch.families import get_family

    diffusers.logging.set_verbosity_error()
    fam = get_family("sd1" if latent_channels == 4 else "flux")
    cfg = {k: v for k, v in family_config(fam.name).items() if not k.startswith("_")}
    torch.manual_seed(seed)
    module = AutoencoderKL(**cfg)
    torch.nn.Module.to(module, device=device, dtype=dtype)
    return DiffusersVAE(module, fam, name=f"sd-architecture-{fam.name}-random")


def tiny_vae(seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A small real AutoencoderKL (widths 32, 64, 64, 64; one layer per block; 1/8 latents) as our
    backend: for dry runs of the benchmarks, where the SD-size VAE would only cost time."""
    import diffusers
    from diffusers import AutoencoderKL

    from lib_vaebatch.backends.diffusers_vae import DiffusersVAE
    from lib_vaebatch.families import get_family

    diffusers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    widths = (32, 64, 64, 64)
    module = AutoencoderKL(
        block_out_channels=widths,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
    )
    torch.nn.Module.to(module, device=device, dtype=dtype)
    return DiffusersVAE(module, get_family("sd1"), name="tiny-random")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith(field)), None)
    except OSError:
        return None


def rss_peak_start() -> int | None:
    """Reset the process's peak resident set (Linux: ``/proc/self/clear_refs``) and return the
    resident set now, in bytes; None where that cannot be done."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    now = _status_kib("VmRSS:")
    return None if now is None else now * 1024


def rss_peak_since(start: int | None) -> int | None:
    """How far the peak resident set rose above ``start`` (from :func:`rss_peak_start`), bytes."""
    peak = _status_kib("VmHWM:") if start is not None else None
    return None if peak is None or start is None else max(0, peak * 1024 - start)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def write(name: str, payload: dict[str, Any], table: str) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    js = RESULTS / f"{name}.json"
    md = RESULTS / f"{name}.md"
    js.write_text(json.dumps(payload, indent=2) + "\n")
    md.write_text(table + "\n")
    return js, md
