"""Engine throughput against a fixed chunk size (the planner's throughput cap lifted), to check the
planner's device policy, e.g. one sample per chunk for convolutional VAEs on the CPU.

    ./dev.sh py bench/bench_chunks.py --size 512 --images 4 --chunks 1 2 4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, median, sd_vae, timed, write
from lib_vaebatch.devices import default_dtype, dtype_name, parse_dtype, resolve_device
from lib_vaebatch.engine.decode import decode_latents
from lib_vaebatch.engine.options import EngineOptions


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    device = resolve_device(args.device)
    dtype = default_dtype(device) if args.dtype == "auto" else parse_dtype(args.dtype)
    vae = sd_vae(device=str(device), dtype=dtype)
    vae.max_efficient_chunk = lambda op: None  # type: ignore[method-assign]  # memory alone decides
    lat = torch.randn(
        args.images, 4, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(0)
    )

    def run(chunk: int) -> list[int]:
        result = decode_latents(vae, lat, options=EngineOptions(chunk_mode="auto", max_chunk=chunk))
        assert result.ok
        return result.chunk_sizes

    run(args.chunks[0])
    times: dict[int, list[float]] = {c: [] for c in args.chunks}
    used: dict[int, list[int]] = {}
    for r in range(args.repeats):
        order = args.chunks[r % len(args.chunks) :] + args.chunks[: r % len(args.chunks)]
        for c in order:
            times[c].append(timed(lambda c=c: used.__setitem__(c, run(c)), device))
        print(
            f"repeat {r + 1}: " + ", ".join(f"chunk {c} {times[c][-1]:.2f}s" for c in args.chunks), flush=True
        )
    base = median(times[args.chunks[0]])
    rows = [
        {"chunk": c, "chunks_used": used[c], "times": times[c], "median": median(times[c]),
         "images_per_s": args.images / median(times[c]), "speedup_vs_first": base / median(times[c])}
        for c in args.chunks
    ]  # fmt: skip
    info = machine()
    lines = [
        (
            f"Engine decode, {args.images} x {args.size}², SD-architecture VAE, {dtype_name(dtype)} on "
            f"{device.type} ({info.get('gpu', info['cpu'])}), median of {args.repeats}."
        ),
        "",
        f"| chunk | s | images/s | vs chunk {args.chunks[0]} |",
        "|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['chunk']} | {r['median']:.2f} | {r['images_per_s']:.3f} | {r['speedup_vs_first']:.3f}× |"
        for r in rows
    ]
    name = args.name or f"chunks-{device.type}-{args.size}"
    js, md = write(
        name, {"benchmark": "chunks", "machine": info, "size": args.size, "rows": rows}, "\n".join(lines)
    )
    print("\n".join(lines))
    print(f"wrote {js} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
