"""One measured run for bench_tiling.py (a fresh process per configuration, so peaks are its own).

python bench/tiling_child.py OP SIZE CHANNELS MODE TILE DTYPE DEVICE   -> one JSON line
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
from lib_vaebatch.devices import parse_dtype
from lib_vaebatch.tiling import TileSettings, run_tiled


def _rss(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def main() -> None:
    op, size, channels, mode, tile, dtype_name, device_name = sys.argv[1:8]
    size, channels = int(size), int(channels)
    dtype, device = parse_dtype(dtype_name), torch.device(device_name)
    vae = sd_vae(channels, device=str(device), dtype=dtype)
    m = vae.module
    settings = TileSettings(mode if mode != "untiled" else "exact", int(tile) if tile != "auto" else None)
    gen = torch.Generator().manual_seed(0)

    def run(px: int) -> torch.Tensor:
        if op == "decode":
            z = torch.randn(1, channels, px // 8, px // 8, generator=gen).to(device, dtype)
            if mode == "untiled":
                return m.decode(z).sample
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
        run(size)
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = _rss("VmHWM:") - base
        seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_bytes": peak}))


if __name__ == "__main__":
    main()
