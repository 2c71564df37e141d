"""``cache`` throughput: in-process against Ray Data with 1 and 2 encode workers, on the same images,
plus the cost of each stage measured alone (header scan, load + resize + crop, encode, write), to
reason about scaling. Every arm must produce the same index and bit-identical shards (checked).

    ./dev.sh py bench/bench_cache.py                       # 32 images, SD-architecture VAE, 256² buckets
    ./dev.sh py bench/bench_cache.py --vae tiny --images 96 --name cache-cpu-tiny

The Ray arms share one local instance (``ray.init(num_cpus=--cpus)``, started once, its start-up
time reported apart); each arm is one job, so its time includes starting the job's worker
processes and loading the VAE in each actor. Writes bench/results/<name>.json and .md. Not part of
the tests or CI.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, sd_vae, tiny_vae, write
from lib_vaebatch.backends import load_vae
from lib_vaebatch.cache.buckets import BucketSpec
from lib_vaebatch.cache.run import load_plan, open_out, run_cache
from lib_vaebatch.cache.settings import CacheSettings
from lib_vaebatch.cache.shards import (
    cache_engine_options,
    encode_shard,
    load_shard,
    vae_identity,
    write_shard,
)
from lib_vaebatch.cache.sources import build_manifest, find_sources


def make_images(root: Path, n: int, lo: int, hi: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
        base = rng.integers(0, 256, size=(h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC)
        (root / f"d{i % 4}").mkdir(parents=True, exist_ok=True)
        img.save(root / f"d{i % 4}" / f"img{i:04d}.{'jpg' if i % 2 else 'png'}")


def save_vae(kind: str, path: Path) -> Path:
    from safetensors.torch import save_file

    backend = sd_vae() if kind == "sd" else tiny_vae()
    save_file({k: v.contiguous() for k, v in backend.module.state_dict().items()}, str(path))
    return path


def stage_costs(src: Path, vae: Path, settings: CacheSettings, batch: int, work: Path) -> dict[str, float]:
    """Seconds per image of each stage, run alone in this process (one thread for the encode)."""
    t = time.perf_counter()
    items = build_manifest(find_sources([src]), settings.buckets, orient=True)
    scan = (time.perf_counter() - t) / len(items)
    by_key = {i.source.key: i for i in items}
    open_out(work, settings, overwrite=True)
    plan = load_plan(work, items, settings)
    backend = load_vae(str(vae), device="cpu")
    opts = cache_engine_options(None, batch)
    torch.set_num_threads(1)
    load = encode = save = 0.0
    for task in plan:
        t0 = time.perf_counter()
        loaded = load_shard(task, by_key, settings)
        t1 = time.perf_counter()
        encoded = encode_shard(backend, loaded, settings, opts)
        t2 = time.perf_counter()
        write_shard(work, encoded, settings)
        t3 = time.perf_counter()
        load, encode, save = load + t1 - t0, encode + t2 - t1, save + t3 - t2
    n = len(items)
    return {"header_scan": scan, "load_resize_crop": load / n, "encode": encode / n, "write": save / n}


def same_outputs(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    if (a / "index.jsonl").read_text() != (b / "index.jsonl").read_text():
        return False
    files = sorted(p.relative_to(a) for p in a.rglob("part-*.safetensors"))
    if files != sorted(p.relative_to(b) for p in b.rglob("part-*.safetensors")):
        return False
    for f in files:
        x, y = load_file(a / f), load_file(b / f)
        if x.keys() != y.keys() or not all(x[k].equal(y[k]) for k in x):
            return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae", choices=("sd", "tiny"), default="sd")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--min-side", type=int, default=192)
    ap.add_argument("--max-side", type=int, default=512)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--shard-size", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    ap.add_argument("--name", default="cache-cpu")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="vaebatch-bench-cache-"))
    try:
        src = work / "images"
        make_images(src, args.images, args.min_side, args.max_side)
        vae = save_vae(args.vae, work / "vae.safetensors")
        backend = load_vae(str(vae), device="cpu")
        spec = BucketSpec(args.resolution, 64, 128, args.resolution * 2)
        settings = CacheSettings(vae=vae_identity(backend), buckets=spec, shard_size=args.shard_size)
        costs = stage_costs(src, vae, settings, args.batch_size, work / "stages")
        print("per-image stage costs (s):", json.dumps({k: round(v, 4) for k, v in costs.items()}))
        arms: dict[str, dict[str, float]] = {}

        t = time.perf_counter()
        run = run_cache([src], work / "inprocess", settings, backend=backend, batch_size=args.batch_size)
        arms["in-process"] = {"seconds": time.perf_counter() - t, "images": run.encoded}
        import ray

        t = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        ray_init = time.perf_counter() - t
        for workers in (1, 2):
            out = work / f"ray{workers}"
            t = time.perf_counter()
            ray_args = {
                "vae": str(vae),
                "workers": workers,
                "options": cache_engine_options(None, args.batch_size),
            }
            run = run_cache([src], out, settings, batch_size=args.batch_size, ray=ray_args)
            arms[f"Ray, {workers} encode worker{'s' if workers > 1 else ''}"] = {
                "seconds": time.perf_counter() - t,
                "images": run.encoded,
            }
            if not same_outputs(work / "inprocess", out):
                raise SystemExit(f"{out}: outputs differ from the in-process run")
        ray.shutdown()
        for a in arms.values():
            a["images_per_s"] = a["images"] / a["seconds"]
        payload = {
            "machine": machine(),
            "args": vars(args),
            "ray": ray.__version__,
            "ray_init_seconds": ray_init,
            "stage_seconds_per_image": costs,
            "arms": arms,
            "identical_outputs": True,
        }
        rows = [
            f"| {name} | {a['images']} | {a['seconds']:.1f} | {a['images_per_s']:.2f} |"
            for name, a in arms.items()
        ]
        m = payload["machine"]
        title = (
            f"`bench/bench_cache.py` ({args.vae} VAE, {args.images} images {args.min_side}-{args.max_side} "
            f"px, {args.resolution}² buckets, batch {args.batch_size}); {m['cpu']}, {m['cores']} cores, "
            f"load average {m['load_average']}; Ray {ray.__version__} local, {args.cpus} CPUs "
            f"(start-up {ray_init:.1f} s, not counted)"
        )
        table = "\n".join(
            [
                title,
                "",
                "| run | images | seconds | images/s |",
                "|---|---:|---:|---:|",
                *rows,
                "",
                "Per image, each stage alone (s): "
                + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in costs.items()),
            ]
        )
        js, md = write(args.name, payload, table)
        print(table)
        print(f"wrote {js} and {md}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
