"""One measured run for bench_tiling.py (a fresh process per configuration, so peaks are its own).

python bench/tiling_child.py OP SIZE CHANNELS MODE TILE DTYPE DEVICE [SAVE]   -> one JSON line

MODE: untiled, exact, fast, auto, plain, or one of them with a memory budget in bytes
(``exact@1073741824``), exact and fast spilling whole values that do not fit the budget to a
temporary file as the engine does; ``recompute`` is exact without spilling (recomputation only);
``single64`` is the peers' single pass (independent tiles of 64 latent pixels with an overlap of 16,
our plain tiles). SAVE: write the output there (safetensors).
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import sd_vae
from lib_vaebatch.devices import free_memory, parse_dtype
from lib_vaebatch.tiling import TileSettings, default_store, run_tiled
from lib_vaebatch.tiling.plain import run_plain


def _rss(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def main() -> None:
    op, size, channels, mode, tile, dtype_name, device_name = sys.argv[1:8]
    save = sys.argv[8] if len(sys.argv) > 8 else None
    size, channels = int(size), int(channels)
    dtype, device = parse_dtype(dtype_name), torch.device(device_name)
    vae = sd_vae(channels, device=str(device), dtype=dtype)
    m = vae.module
    name, _, budget = mode.partition("@")
    settings = TileSettings(
        name if name in ("exact", "fast", "auto", "plain") else "exact",  # type: ignore[arg-type]
        int(tile) if tile != "auto" else None,
        budget=int(budget) if budget else None,
        spill=None if name == "recompute" else default_store(device, free_memory(torch.device("cpu"))),
    )
    gen = torch.Generator().manual_seed(0)

    def latent(px: int) -> torch.Tensor:
        # structured, like a real picture's latent: smooth noise plus detail (the fast mode's
        # statistics and the plain tiles' seams are judged on it)
        low = torch.randn(1, channels, max(1, px // 64), max(1, px // 64), generator=gen)
        smooth = torch.nn.functional.interpolate(low, size=(px // 8, px // 8), mode="bicubic")
        return (smooth + 0.3 * torch.randn(1, channels, px // 8, px // 8, generator=gen)).to(device, dtype)

    def run(px: int) -> torch.Tensor:
        if op == "decode":
            z = latent(px)
            if mode == "untiled":
                return m.decode(z).sample
            if mode == "single64":
                return run_plain(vae.tiling_program("decode"), z, tile=64, overlap=16)
            return run_tiled(vae.tiling_program("decode"), z, settings)
        x = (torch.rand(1, 3, px, px, generator=gen) * 2 - 1).to(device, dtype)
        if mode == "untiled":
            return m.encode(x).latent_dist.mean
        return run_tiled(vae.tiling_program("encode"), x, settings)

    with torch.no_grad():
        run(64)  # first-call costs out of the measurement
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak-RSS mark
            base = _rss("VmRSS:")
        start = time.perf_counter()
        out = run(size)
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = _rss("VmHWM:") - base
        seconds = time.perf_counter() - start
    if save:
        from safetensors.torch import save_file

        save_file({"out": out.float().contiguous().cpu()}, save)
    print(json.dumps({"seconds": seconds, "peak_bytes": peak, "used_mode": settings.used_mode,
                      "planned_bytes": settings.planned_bytes, "used_tile": settings.used_tile,
                      "spilled_bytes": settings.spilled_bytes}))  # fmt: skip


if __name__ == "__main__":
    main()
