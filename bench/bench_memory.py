"""Peak working memory of one decode/encode of the SD-architecture VAE, measured as the rise of the
process's peak RSS (CPU) or peak allocated bytes (CUDA), each configuration in its own subprocess.
The engine's memory model (lib_vaebatch/backends/base.py) is printed beside it for comparison.

    ./dev.sh py bench/bench_memory.py                      # decode+encode at 256 and 512, fp32
    ./dev.sh py bench/bench_memory.py --sizes 512 --dtypes fp32 bf16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[5])
from bench.common import sd_vae
from lib_vaebatch.devices import parse_dtype
op, size, dtype, device = sys.argv[1], int(sys.argv[2]), parse_dtype(sys.argv[3]), torch.device(sys.argv[4])
vae = sd_vae(device=str(device), dtype=dtype)
x = (torch.randn(1, 4, size // 8, size // 8) if op == "decode" else torch.rand(1, 3, size, size) * 2 - 1)
x = x.to(device, dtype)

def rss(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))

with torch.no_grad():
    if device.type == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    else:
        import gc; gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS mark
        base = rss("VmRSS:")
    y = vae.decode(x) if op == "decode" else vae.encode(x).mean
    if device.type == "cuda":
        torch.cuda.synchronize(); peak = torch.cuda.max_memory_allocated()
    else:
        peak = rss("VmHWM:")
print(json.dumps({"peak_bytes": peak - base}))
"""


def main() -> int:
    from bench.common import machine, sd_vae, write
    from lib_vaebatch.engine.planner import estimate_bytes

    planner_vae = sd_vae()  # only its planning hints are used
    from lib_vaebatch.devices import parse_dtype, resolve_device

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", nargs="+", default=["decode", "encode"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--dtypes", nargs="+", default=["fp32"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    device = resolve_device(args.device)
    rows = []
    for op in args.ops:
        for dt in args.dtypes:
            for size in args.sizes:
                proc = subprocess.run(
                    [sys.executable, "-c", CHILD, op, str(size), dt, str(device), str(ROOT)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]
                size_b = 2 if parse_dtype(dt) != parse_dtype("fp32") else 4
                per_px = peak / (size * size) / size_b
                planned = estimate_bytes(planner_vae, op, size * size, parse_dtype(dt))
                planned += planner_vae.fixed_bytes(op)
                rows.append(
                    {
                        "op": op,
                        "size": size,
                        "dtype": dt,
                        "peak_bytes": peak,
                        "bytes_per_pixel_per_dtype_byte": per_px,
                        "planned_bytes": planned,
                    }
                )
                print(
                    f"{op} {size}² {dt}: peak +{peak / 2**20:.0f} MiB = {per_px:.0f} B/px/dtype-byte "
                    f"(engine plans {planned / 2**20:.0f} MiB)",
                    flush=True,
                )
    info = machine()
    lines = [
        (
            f"Peak working memory of one sample, SD-architecture VAE, {device.type} "
            f"({info.get('gpu', info['cpu'])})."
        ),
        "",
        "| op | size | dtype | peak rise | bytes / px / dtype byte | engine plans |",
        "|---|---:|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r['op']} | {r['size']}² | {r['dtype']} | {r['peak_bytes'] / 2**20:.0f} MiB "
        f"| {r['bytes_per_pixel_per_dtype_byte']:.0f} | {r['planned_bytes'] / 2**20:.0f} MiB |"
        for r in rows
    ]
    js, md = write(
        args.name or f"memory-{device.type}",
        {"benchmark": "memory", "machine": info, "rows": rows},
        "\n".join(lines),
    )
    print("\n".join(lines))
    print(f"wrote {js} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
