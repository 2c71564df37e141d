"""Decode throughput of the engine at its default settings against A1111's per-sample loop and one
whole-batch decode: same weights, dtype and attention kernel, in one process, median of N runs,
methods interleaved within each repeat (in rotating order) so drift hits them alike.

    ./dev.sh bench                         # CPU: 256 and 512, batch 1/4/8, 3 repeats
    ./dev.sh bench --sizes 256 --batches 1 4 --repeats 3 --name quick

Writes bench/results/<name>.json and .md. Not part of the tests or CI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.baselines import a1111_decode_latent_batch
from bench.common import machine, median, sd_vae, timed, write
from lib_vaebatch.devices import default_dtype, dtype_name, parse_dtype, resolve_device
from lib_vaebatch.engine.decode import decode_latents
from lib_vaebatch.engine.options import EngineOptions
from lib_vaebatch.families import to_raw

METHODS = ("engine", "a1111_per_sample", "whole_batch")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sides in pixels")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--name", default=None, help="result file name (default decode-<device>)")
    args = ap.parse_args()

    device = resolve_device(args.device)
    dtype = default_dtype(device) if args.dtype == "auto" else parse_dtype(args.dtype)
    vae = sd_vae(device=str(device), dtype=dtype)
    options = EngineOptions()

    last_chunks: list[int] = []

    def engine(lat: torch.Tensor) -> object:
        result = decode_latents(vae, lat, options=options)
        assert result.ok, result.reports
        last_chunks[:] = result.chunk_sizes
        return result

    def a1111(lat: torch.Tensor) -> object:
        return a1111_decode_latent_batch(vae, lat)

    def whole(lat: torch.Tensor) -> object:
        with torch.no_grad():
            z = to_raw(lat.to(device, dtype), vae.scaling_factor, vae.shift_factor)
            return vae.decode(z).to("cpu")

    fns = {"engine": engine, "a1111_per_sample": a1111, "whole_batch": whole}
    rows = []
    for size in args.sizes:
        warm = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(1))
        for fn in fns.values():
            fn(warm)  # first-call costs (allocator, autotuning) out of the measurement
        for batch in args.batches:
            lat = torch.randn(batch, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(batch))
            times: dict[str, list[float]] = {m: [] for m in METHODS}
            for r in range(args.repeats):
                order = (
                    METHODS[r % len(METHODS) :] + METHODS[: r % len(METHODS)]
                )  # rotate: no method always first
                for m in order:
                    times[m].append(timed(lambda m=m, lat=lat: fns[m](lat), device))
                print(
                    f"size {size} batch {batch} repeat {r + 1}: "
                    + ", ".join(f"{m} {times[m][-1]:.2f}s" for m in METHODS),
                    flush=True,
                )
            med = {m: median(times[m]) for m in METHODS}
            rows.append(
                {
                    "size": size,
                    "batch": batch,
                    "times": times,
                    "median": med,
                    "images_per_s": {m: batch / med[m] for m in METHODS},
                    "engine_vs_a1111": med["a1111_per_sample"] / med["engine"],
                    "engine_vs_whole": med["whole_batch"] / med["engine"],
                    "engine_chunks": list(last_chunks),
                }
            )

    info = machine()
    where = info.get("gpu", info["cpu"]) if device.type == "cuda" else info["cpu"]
    lines = [
        (
            f"Decode throughput, SD-architecture VAE (random weights), {dtype_name(dtype)} on {device.type} "
            f"({where}), torch {info['torch']}, median of {args.repeats}."
        ),
        "",
        "| size | batch | engine s | A1111 loop s | whole batch s | engine / A1111 | engine / whole |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        m = r["median"]
        lines.append(
            f"| {r['size']}² | {r['batch']} | {m['engine']:.2f} | {m['a1111_per_sample']:.2f} "
            f"| {m['whole_batch']:.2f} | {r['engine_vs_a1111']:.3f}× | {r['engine_vs_whole']:.3f}× |"
        )
    table = "\n".join(lines)
    name = args.name or f"decode-{device.type}"
    payload = {
        "benchmark": "decode",
        "machine": info,
        "device": str(device),
        "dtype": dtype_name(dtype),
        "repeats": args.repeats,
        "rows": rows,
    }
    js, md = write(name, payload, table)
    print(table)
    print(f"wrote {js} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
