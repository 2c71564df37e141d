"""Decode and save overlap (issue 5 §3): ``decode_to_folder`` with its background writers against
decode-then-save in sequence, in one process, on the built-in approximate VAE (so the saving, not
the VAE, is most of the work). Both arms write byte-identical files (checked). Median of N runs,
arms interleaved within each repeat (in rotating order) so drift hits them alike.

    ./dev.sh py bench/bench_save_overlap.py                      # 16 x 1024², PNG, 3 repeats
    ./dev.sh py bench/bench_save_overlap.py --images 8 --size 512 --format jpg --name quick

Rows: ``sequential`` decodes the whole batch, then converts, encodes and writes each image (the
baseline); ``inline`` is ``decode_to_folder(writers=0)``, each
image saved in the decode thread as it lands; ``overlapped`` is ``decode_to_folder`` as shipped.
Writes bench/results/<name>.json and .md. Not part of the tests or CI.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, median, write
from lib_vaebatch.backends import ApproxVAE
from lib_vaebatch.engine.decode import decode_latents
from lib_vaebatch.engine.options import EngineOptions
from lib_vaebatch.images import tensor_to_image
from lib_vaebatch.jobs import _decoration, _token_values, decode_infotext, decode_to_folder
from lib_vaebatch.latents import LatentBatch
from lib_vaebatch.naming import SequentialNamer
from lib_vaebatch.saving import save_image
from lib_vaebatch.writer import default_workers

ARMS = ("sequential", "inline", "overlapped")
TARGET = 0.7


def structured_latents(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Seeded latents with image-like structure: smooth shapes at several scales plus a little
    grain (pure noise would make every PNG incompressible, unlike real decodes)."""
    g = torch.Generator().manual_seed(seed)
    h = size // 8
    z = torch.zeros(n, 4, h, h)
    for cells, weight in ((4, 1.0), (16, 0.5), (h, 0.15)):
        coarse = torch.randn(n, 4, cells, cells, generator=g)
        z += weight * F.interpolate(coarse, size=(h, h), mode="bicubic", align_corners=False)
    return z * 3.0  # scaled (sampler) space, roughly the spread of real SD latents


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels")
    ap.add_argument("--format", default="png")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--writers", type=int, default=None, help="writer threads (default: decode_to_folder's)")
    ap.add_argument("--max-pending", type=int, default=None)
    ap.add_argument("--max-chunk", type=int, default=None, help="decode chunk cap (default: the planner's)")
    ap.add_argument("--name", default=None, help="result file name (default save-overlap-cpu-<size>-<fmt>)")
    args = ap.parse_args()

    vae = ApproxVAE("sd1")
    batch = LatentBatch(structured_latents(args.images, args.size), family="sd1", path="bench.safetensors")
    family = batch.resolve_family(vae.family)
    options = EngineOptions(max_chunk=args.max_chunk)
    root = Path(tempfile.mkdtemp(prefix="vaebatch-bench-"))
    times: dict[str, list[float]] = {a: [] for a in ARMS}
    cpu: dict[str, list[float]] = {a: [] for a in ARMS}  # process CPU seconds: the work, whatever the load
    parts: dict[str, list[float]] = {k: [] for k in ("seq_decode", "seq_convert", "seq_write", "ovl_decode")}
    chunks: list[int] = []

    def sequential(out: Path) -> None:
        t0 = time.perf_counter()
        result = decode_latents(vae, batch.latents, options=options)
        t1 = time.perf_counter()
        assert result.ok, result.reports
        images = [tensor_to_image(s) for s in result.outputs if s is not None]
        t2 = time.perf_counter()
        namer = SequentialNamer(out)
        for i, (image, report) in enumerate(zip(images, result.reports, strict=True)):
            text = decode_infotext(batch, i, vae, family, report)
            deco = _decoration(None, _token_values(batch, i, vae, family, text))
            save_image(image, namer, deco, fmt=args.format, infotext=text)
        t3 = time.perf_counter()
        parts["seq_decode"].append(t1 - t0)
        parts["seq_convert"].append(t2 - t1)
        parts["seq_write"].append(t3 - t2)

    def pipeline(out: Path, writers: int | None) -> float:
        job = decode_to_folder(
            [batch],
            out,
            lambda fam: vae,
            options=options,
            fmt=args.format,
            writers=writers,
            max_pending=args.max_pending,
        )
        assert job.ok and len(job.saved) == args.images, job.save_errors
        chunks[:] = job.files[0].result.chunk_sizes
        return job.files[0].result.seconds

    def run(arm: str, out: Path) -> float:
        cpu_start = time.process_time()
        start = time.perf_counter()
        if arm == "sequential":
            sequential(out)
        elif arm == "inline":
            pipeline(out, 0)
        else:
            parts["ovl_decode"].append(pipeline(out, args.writers))
        wall = time.perf_counter() - start
        cpu[arm].append(time.process_time() - cpu_start)
        return wall

    identical = True
    try:
        warm = root / "warm"  # first-call costs (imports, allocator, zlib tables) out of the figures
        for arm in ARMS:
            run(arm, warm / arm)
        for r in range(args.repeats):
            order = ARMS[r % len(ARMS) :] + ARMS[: r % len(ARMS)]
            sums = {}
            for arm in order:
                out = root / f"{r}-{arm}"
                times[arm].append(run(arm, out))
                sums[arm] = digest(out)
                shutil.rmtree(out)
            identical &= all(sums[a] == sums["sequential"] for a in ARMS)
            print(f"repeat {r + 1}: " + ", ".join(f"{a} {times[a][-1]:.2f}s" for a in ARMS), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if not identical:
        print("error: the arms wrote different files", file=sys.stderr)
        return 1

    base = median(times["sequential"])
    rows = [
        {"arm": a, "times": times[a], "median": median(times[a]), "vs_sequential": median(times[a]) / base,
         "cpu_s": cpu[a][-args.repeats :], "cpu_median": median(cpu[a][-args.repeats :])}
        for a in ARMS
    ]  # fmt: skip
    split = {k: median(v) for k, v in parts.items()}
    ratio = rows[-1]["vs_sequential"]
    save = split["seq_convert"] + split["seq_write"]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())  # other work on the machine skews the figures
    info = machine()
    writers = default_workers() if args.writers is None else args.writers
    lines = [
        (
            f"Decode and save, {args.images} x {args.size}², {args.format.upper()}, built-in approximate "
            f"VAE on the CPU ({info['cpu']}, {info['cores']} cores), {writers} writer thread(s), decode "
            f"chunks {chunks}, median of {args.repeats}. Files byte-identical across arms."
        ),
        "",
        "| arm | wall s | vs sequential | CPU s | CPU / wall |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['arm']} | {r['median']:.2f} | {r['vs_sequential']:.3f}× | {r['cpu_median']:.2f} "
        f"| {r['cpu_median'] / r['median']:.2f} |"
        for r in rows
    ]
    lines += [
        "",
        (
            f"Sequential split: decode {split['seq_decode']:.2f} s, save {save:.2f} s (tensor→image "
            f"{split['seq_convert']:.2f} s, encode+write {split['seq_write']:.2f} s). Overlapped: decode "
            f"loop {split['ovl_decode']:.2f} s (including waits for a free writer slot). Load average "
            f"at the end {load}."
        ),
        (f"Target ≤ {TARGET}× sequential: {'met' if ratio <= TARGET else 'missed'} ({ratio:.3f}×)."),
    ]
    name = args.name or f"save-overlap-cpu-{args.size}-{args.format}"
    payload = {
        "benchmark": "save_overlap",
        "machine": info,
        "images": args.images,
        "size": args.size,
        "format": args.format,
        "writers": writers,
        "max_pending": args.max_pending,
        "chunk_sizes": chunks,
        "identical_files": identical,
        "rows": rows,
        "split_medians": split,
        "target": TARGET,
        "load_average": os.getloadavg(),
    }
    js, md = write(name, payload, "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {js} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
