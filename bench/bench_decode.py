"""Decode throughput of the engine at its default settings against A1111's per-sample loop, one
whole-batch decode, and a plain channels-last decode (the whole batch through a copy of the module
converted to channels_last once, input channels_last, under torch.inference_mode: what a tuned
diffusers user writes): same weights, dtype and attention kernel, in one process, median of N runs,
methods interleaved within each repeat (in rotating order) so drift hits them alike.

    ./dev.sh bench                         # CPU: 256 and 512, batch 1/4/8, 3 repeats
    ./dev.sh bench --sizes 256 --batches 1 4 --repeats 3 --name quick

Before the measured runs, each method decodes once at each size, and the engine runs each batch
until its CPU layout probe (lib_vaebatch/layout.py) has decided for every chunk shape the engine
plans for it: first-call costs and the probe, which a long-running process pays once per shape,
are out of the measurement. The JSON records
the machine (CPU model, cores, torch version and threads, load average before and after), the
engine's layout decision and the largest difference between the engine's and the other outputs.

Writes bench/results/<name>.json and .md. Not part of the tests or CI.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.baselines import a1111_decode_latent_batch
from bench.common import (
    RESULTS,
    load_average,
    machine,
    median,
    rss_peak_since,
    rss_peak_start,
    sd_vae,
    timed,
    write,
)
from lib_vaebatch.devices import default_dtype, dtype_name, parse_dtype, resolve_device
from lib_vaebatch.engine.decode import decode_latents
from lib_vaebatch.engine.options import EngineOptions
from lib_vaebatch.families import to_raw

METHODS = ("engine", "a1111_per_sample", "whole_batch", "plain_channels_last")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sides in pixels")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--name", default=None, help="result file name (default decode-<device>)")
    ap.add_argument(
        "--methods", nargs="+", default=list(METHODS), choices=METHODS, help="which to time (engine always)"
    )
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

    # The plain channels-last decode gets its own copy of the module, converted once (the engine
    # and A1111's loop keep using the original, contiguous one).
    plain_module = copy.deepcopy(vae.module)
    torch.nn.Module.to(plain_module, memory_format=torch.channels_last)

    def plain_cl(lat: torch.Tensor) -> object:
        with torch.inference_mode():
            z = to_raw(lat.to(device, dtype), vae.scaling_factor, vae.shift_factor)
            z = z.contiguous(memory_format=torch.channels_last)
            return plain_module.decode(z, return_dict=False)[0].to("cpu")

    def same_kernels(lat: torch.Tensor) -> torch.Tensor:
        """The plain decode that runs the kernels the engine chose for each of its chunks: the
        plain channels-last module or the original one, the chunk whole or one sample at a time."""
        parts, at = [], 0
        for size in last_chunks:
            chunk = lat[at : at + size]
            at += size
            key = ("decode", (size, *lat.shape[1:]), dtype, device)
            form = vae.tuner.decision(vae.module, key)
            pieces = chunk.split(1) if form is not None and form.per_sample else [chunk]
            for piece in pieces:
                if form is not None and form.channels_last:
                    parts.append(plain_cl(piece))
                else:
                    parts.append(whole(piece))
        return torch.cat(parts).float()

    every = {
        "engine": engine,
        "a1111_per_sample": a1111,
        "whole_batch": whole,
        "plain_channels_last": plain_cl,
    }
    methods = tuple(m for m in METHODS if m == "engine" or m in args.methods)
    fns = {m: every[m] for m in methods}
    load_before = load_average()
    rows: list[dict] = []
    name = args.name or f"decode-{device.type}"

    def report(final: bool) -> str:
        info = machine()
        info["load_average_before"] = load_before
        where = info.get("gpu", info["cpu"]) if device.type == "cuda" else info["cpu"]
        lines = [
            (
                f"Decode throughput, SD-architecture VAE (random weights), {dtype_name(dtype)} "
                f"on {device.type} "
                f"({where}), torch {info['torch']}, median of {args.repeats}."
            ),
            "",
            (
                f"Load average before/after: {load_before} / {load_average()} (1/5/15 min); "
                f"{info['cores']} cores, {info['torch_threads']} torch threads."
            ),
            "",
            (
                "| size | batch | engine layout | engine s | A1111 loop s | whole batch s | plain CL s "
                "| engine / A1111 | engine / plain CL | engine / whole "
                "| max abs diff vs plain CL | vs same-kernel plain | peak MiB engine / plain CL |"
            ),
            "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            m = r["median"]
            cells = [f"{m[k]:.2f}" if k in m else "-" for k in METHODS]
            ratios = [
                f"{r[k]:.3f}×" if r[k] is not None else "-"
                for k in ("engine_vs_a1111", "engine_vs_plain_channels_last", "engine_vs_whole")
            ]
            diff_cl = r["max_abs_diff_batch"].get("vs_plain_channels_last")
            diffs = [
                f"{diff_cl:.1e}" if diff_cl is not None else "-",
                f"{r['max_abs_diff_same_kernels']:.1e}",
            ]
            peak = r.get("peak_rss_mib", {})
            diffs.append(
                f"{peak['engine']:.0f} / {peak['plain_channels_last']:.0f}"
                if "engine" in peak and "plain_channels_last" in peak
                else "-"
            )
            lines.append(
                f"| {r['size']}² | {r['batch']} | {r['engine_layout'] or '-'} | "
                + " | ".join(cells + ratios + diffs)
                + " |"
            )
        table = "\n".join(lines)
        payload = {
            "benchmark": "decode",
            "machine": info,
            "device": str(device),
            "dtype": dtype_name(dtype),
            "repeats": args.repeats,
            "rows": rows,
        }
        payload["complete"] = final
        write(name, payload, table)
        return table

    last_out: dict[str, object] = {}

    def keep(m: str, out: object) -> None:
        last_out[m] = out  # the last timed output of each method, compared once the row is done

    settle_runs: dict[torch.Size, int] = {}  # engine decodes each input shape took to settle

    def settle(lat: torch.Tensor) -> set[str]:
        """Run the engine on ``lat`` until its layout probe (a few real decodes, once per process
        and input shape) has decided for every chunk shape it plans; the layouts it chose."""
        for _ in range(48):  # a batch is timed in four forms (two layouts, batched or per sample)
            settle_runs[lat.shape] = settle_runs.get(lat.shape, 0) + 1
            engine(lat)
            keys = [("decode", (c, *lat.shape[1:]), dtype, device) for c in set(last_chunks)]
            found = [vae.tuner.decision(vae.module, k) for k in keys]
            if device.type != "cpu" or all(d is not None for d in found):
                return {d.name for d in found if d is not None}
        return set()

    for size in args.sizes:
        warm = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(1))
        for fn in fns.values():
            fn(warm)  # first-call costs (allocator, autotuning) out of the measurement
        settle(warm)
        # On one sample at the first size (three more decodes there; the layouts do not change
        # with the size).
        accuracy = _accuracy(engine, a1111, plain_cl, warm) if size == args.sizes[0] else None
        for batch in args.batches:
            lat = torch.randn(batch, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(batch))
            decisions = settle(lat)  # the engine's chunks of this batch have their own input shapes
            times: dict[str, list[float]] = {m: [] for m in methods}
            peaks: dict[str, list[int]] = {m: [] for m in methods}
            for r in range(args.repeats):
                order = methods[r % len(methods) :] + methods[: r % len(methods)]  # no method always first
                for m in order:
                    last_out.pop(m, None)  # the previous output is not part of this call's peak
                    start = rss_peak_start() if device.type == "cpu" else None
                    times[m].append(timed(lambda m=m, lat=lat: keep(m, fns[m](lat)), device))
                    if (rise := rss_peak_since(start)) is not None:
                        peaks[m].append(rise)
                print(
                    f"size {size} batch {batch} repeat {r + 1}: "
                    + ", ".join(f"{m} {times[m][-1]:.2f}s" for m in methods),
                    flush=True,
                )
            med = {m: median(times[m]) for m in methods}
            ratio = {m: med[m] / med["engine"] for m in methods}  # above 1: the engine is faster
            rows.append(
                {
                    "size": size,
                    "batch": batch,
                    "times": times,
                    "median": med,
                    "images_per_s": {m: batch / med[m] for m in methods},
                    "engine_vs_a1111": ratio.get("a1111_per_sample"),
                    "engine_vs_whole": ratio.get("whole_batch"),
                    "engine_vs_plain_channels_last": ratio.get("plain_channels_last"),
                    "engine_vs_best_baseline": min(
                        (v for m, v in ratio.items() if m in ("a1111_per_sample", "plain_channels_last")),
                        default=None,
                    ),
                    # rise of the process's peak resident set during the call (CPU), MiB
                    "peak_rss_mib": {m: max(p) / 2**20 for m, p in peaks.items() if p},
                    "engine_chunks": list(last_chunks),
                    "settle_runs": settle_runs.get(lat.shape),
                    "engine_layout": "+".join(sorted(decisions)) or None,
                    "max_abs_diff": accuracy,
                    "max_abs_diff_batch": _batch_accuracy(last_out),
                    # against the plain decode running the kernels the engine chose: 0.0 when
                    # the engine adds nothing to them but chunking
                    "max_abs_diff_same_kernels": float(
                        (torch.stack(last_out["engine"].outputs).float() - same_kernels(lat)).abs().max()
                    ),
                }
            )
            last_out.clear()
            report(final=False)  # partial results survive an interrupted run

    table = report(final=True)
    print(table)
    print(f"wrote {RESULTS / name}.json and .md")
    return 0


def _accuracy(engine, a1111, plain_cl, lat: torch.Tensor) -> dict[str, float]:
    """Largest absolute difference of the engine's output from A1111's loop and the plain
    channels-last decode, on one sample."""
    ours = engine(lat).outputs[0].float()
    return {
        "vs_a1111": float((ours - a1111(lat)[0].float()).abs().max()),
        "vs_plain_channels_last": float((ours - plain_cl(lat)[0].float()).abs().max()),
    }


def _batch_accuracy(out: dict[str, object]) -> dict[str, float]:
    """Largest absolute difference of the engine's output for the whole batch (its last timed
    run) from each baseline's last timed output."""
    ours = torch.stack(out["engine"].outputs).float()  # type: ignore[attr-defined]
    diffs = {}
    for m, theirs in out.items():
        if m != "engine":
            ref = torch.stack(list(theirs)) if isinstance(theirs, list) else theirs
            diffs[f"vs_{m}"] = float((ours - ref.float()).abs().max())  # type: ignore[union-attr]
    return diffs


if __name__ == "__main__":
    sys.exit(main())
