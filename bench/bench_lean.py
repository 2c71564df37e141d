"""Memory bounded by the tile: a budget sweep of the exact planner (whole values where they fit,
spilled to a temporary file where not: the engine's default; ``--recompute`` budgets: recomputation
instead of spilling) and of fast mode, against the untiled decode, exact mode with whole values and
the peers' single pass (independent tiles of 64 with an overlap of 16, run with the same module),
on one structured latent of the SD-architecture VAE (random weights, fp32). Each configuration runs
in its own subprocess (bench/tiling_child.py): peak = rise of the process's peak RSS during the
call (spilled values live in the kernel's page cache or on disk, not in the process: the table
gives their planned size); PSNR of the 8-bit image against the untiled decode.

    ./dev.sh py bench/bench_lean.py --size 1024 --budgets 0.6 1 1.5 2 4
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine, write  # noqa: E402

CHILD = Path(__file__).with_name("tiling_child.py")


def psnr8(a: torch.Tensor, b: torch.Tensor) -> float:
    qa = ((a.clamp(-1, 1) + 1) * 127.5).round()
    qb = ((b.clamp(-1, 1) + 1) * 127.5).round()
    mse = float((qa - qb).square().mean())
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--budgets", type=float, nargs="*", default=[0.6, 1.0, 1.5, 2.0, 4.0], help="GiB")
    ap.add_argument("--recompute", type=float, nargs="*", default=[], help="GiB, exact without spilling")
    ap.add_argument("--fast", type=float, nargs="*", default=[], help="GiB, fast mode within a budget")
    ap.add_argument("--modes", nargs="+", default=["untiled", "exact", "fast", "single64"])
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    from safetensors.torch import load_file

    configs = list(args.modes) + [f"exact@{int(b * 2**30)}" for b in args.budgets]
    configs += [f"recompute@{int(b * 2**30)}" for b in args.recompute]
    configs += [f"fast@{int(b * 2**30)}" for b in args.fast]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ref = None
        for mode in configs:
            save = Path(tmp) / "out.safetensors"
            cmd = [
                sys.executable,
                str(CHILD),
                "decode",
                str(args.size),
                "4",
                mode,
                "auto",
                "fp32",
                "cpu",
                str(save),
            ]
            res = json.loads(
                subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1]
            )
            out = load_file(str(save))["out"]
            if mode == "untiled":
                ref = out
            res["psnr"] = psnr8(out, ref) if ref is not None else None
            res["mode"] = mode
            if "@" in mode:
                res["budget_bytes"] = int(mode.split("@")[1])
            rows.append(res)
            print(json.dumps(res), flush=True)
    base = next((r for r in rows if r["mode"] == "untiled"), None)
    single = next((r for r in rows if r["mode"] == "single64"), None)
    info = machine()
    lines = [
        (
            f"Decode {args.size}², SD-architecture VAE (random weights), fp32, CPU ({info['cpu']}, "
            f"{info['cores']} cores), torch {info['torch']}; one run per row, each in its own process."
        ),
        "",
        (
            "| mode | budget GiB | ran | tile | time s | × untiled | peak GiB | × single pass 64/16 "
            "| planned GiB | spilled GiB | PSNR dB |"
        ),
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        b = f"{r['budget_bytes'] / 2**30:.2f}" if "budget_bytes" in r else ""
        tr = f"{r['seconds'] / base['seconds']:.2f}×" if base else ""
        mr = f"{r['peak_bytes'] / single['peak_bytes']:.2f}×" if single else ""
        pl = f"{r['planned_bytes'] / 2**30:.2f}" if r.get("planned_bytes") else ""
        sp = f"{r['spilled_bytes'] / 2**30:.2f}" if r.get("spilled_bytes") else ""
        ps = "∞" if r["psnr"] == math.inf else f"{r['psnr']:.1f}" if r["psnr"] is not None else ""
        ran = r.get("used_mode") or ("plain" if r["mode"] == "single64" else "untiled")
        tile = r.get("used_tile") or ""
        lines.append(f"| {r['mode'].split('@')[0]} | {b} | {ran} | {tile} | {r['seconds']:.1f} "
                     f"| {tr} | {r['peak_bytes'] / 2**30:.2f} | {mr} | {pl} | {sp} | {ps} |")  # fmt: skip
    table = "\n".join(lines)
    name = args.name or f"lean-cpu-{args.size}"
    js, md = write(name, {"benchmark": "lean", "machine": info, "size": args.size, "rows": rows}, table)
    print(table)
    print(f"wrote {js} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
