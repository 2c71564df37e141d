"""Time and peak memory of untiled, exact-tiled and fast-tiled decode/encode of the SD-architecture
VAE (random weights, fp32 unless told), each run in its own subprocess (peak = rise of the process's
peak RSS on CPU, of peak allocated bytes on CUDA), modes interleaved across repeats.

    ./dev.sh py bench/bench_tiling.py                          # 512 and 1024, decode+encode, 16-ch decode
    ./dev.sh py bench/bench_tiling.py --sizes 2048 --repeats 1 --name tiling-cpu-2048

Writes bench/results/<name>.json/.md and, with --plot, a PNG of time and peak memory against size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, machine, median, write  # noqa: E402

MODES = ("untiled", "exact", "fast")

CHILD = Path(__file__).with_name("tiling_child.py")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--ops", nargs="+", default=["decode", "encode"])
    ap.add_argument("--channels16", action="store_true", default=None, help="also decode 16-channel latents")
    ap.add_argument("--no-channels16", dest="channels16", action="store_false")
    ap.add_argument("--modes", nargs="+", default=list(MODES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tile", default="auto", help="tile size in latent pixels, or auto (planned)")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--name", default=None)
    ap.add_argument("--plot", default=None, help="write a PNG plot here")
    args = ap.parse_args()
    with16 = args.channels16 if args.channels16 is not None else 1024 in args.sizes

    configs = [(op, size, 4) for size in args.sizes for op in args.ops]
    if with16:
        configs += [("decode", size, 16) for size in args.sizes if size == 1024]
    results: dict[tuple[str, int, int, str], list[dict[str, float]]] = {}
    for op, size, ch in configs:
        for r in range(args.repeats):
            order = args.modes[r % len(args.modes) :] + args.modes[: r % len(args.modes)]
            for mode in order:
                cmd = [
                    sys.executable,
                    str(CHILD),
                    op,
                    str(size),
                    str(ch),
                    mode,
                    args.tile,
                    args.dtype,
                    args.device,
                ]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                res = json.loads(out.stdout.strip().splitlines()[-1])
                results.setdefault((op, size, ch, mode), []).append(res)
                gib = res["peak_bytes"] / 2**30
                print(f"{op} {size}² {ch}ch {mode}: {res['seconds']:.1f} s, peak +{gib:.2f} GiB", flush=True)

    rows = []
    for (op, size, ch, mode), runs in results.items():
        base = results.get((op, size, ch, "untiled"))
        sec = median([x["seconds"] for x in runs])
        peak = median([x["peak_bytes"] for x in runs])
        row = {
            "op": op,
            "size": size,
            "channels": ch,
            "mode": mode,
            "runs": runs,
            "seconds": sec,
            "peak_bytes": peak,
        }
        if base:
            row["time_ratio"] = sec / median([x["seconds"] for x in base])
            row["memory_ratio"] = peak / median([x["peak_bytes"] for x in base])
        rows.append(row)

    info = machine()
    where = (
        info.get("gpu", info["cpu"])
        if args.device.startswith("cuda")
        else f"{info['cpu']}, {info['cores']} cores"
    )
    lines = [
        (
            f"Tiled vs untiled, SD-architecture VAE (random weights), {args.dtype} on {args.device} "
            f"({where}), torch {info['torch']}, median of {args.repeats}, tile {args.tile}."
        ),
        "",
        "| op | size | ch | mode | time s | peak GiB | time vs untiled | memory vs untiled |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        tr = f"{r['time_ratio']:.2f}×" if "time_ratio" in r else ""
        mr = f"{r['memory_ratio']:.0%}" if "memory_ratio" in r else ""
        lines.append(f"| {r['op']} | {r['size']}² | {r['channels']} | {r['mode']} | {r['seconds']:.1f} "
                     f"| {r['peak_bytes'] / 2**30:.2f} | {tr} | {mr} |")  # fmt: skip
    table = "\n".join(lines)
    name = args.name or f"tiling-{args.device.split(':')[0]}"
    js, md = write(name, {"benchmark": "tiling", "machine": info, "dtype": args.dtype, "tile": args.tile,
                          "repeats": args.repeats, "rows": rows}, table)  # fmt: skip
    print(table)
    print(f"wrote {js} and {md}")
    if args.plot:
        plot([json.loads(p.read_text()) for p in sorted(RESULTS.glob("tiling-*.json"))], Path(args.plot))
    return 0


def plot(payloads: list[dict], path: Path) -> None:
    """Time and peak memory against size for 4-channel decode and encode, every mode."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for p in payloads for r in p["rows"] if r["channels"] == 4]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    for col, op in enumerate(("decode", "encode")):
        for mode, style in zip(MODES, ("o-", "s--", "^:"), strict=True):
            pts = sorted(
                (r["size"], r["seconds"], r["peak_bytes"] / 2**30)
                for r in rows
                if r["op"] == op and r["mode"] == mode
            )
            if not pts:
                continue
            sizes = [p[0] for p in pts]
            axes[0][col].plot(sizes, [p[1] for p in pts], style, label=mode)
            axes[1][col].plot(sizes, [p[2] for p in pts], style, label=mode)
        for row, ylabel in enumerate(("time (s)", "peak memory (GiB)")):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks([512, 1024, 2048], ["512²", "1024²", "2048²"])
            ax.set_xlabel("image size")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{op}: {ylabel.split(' (')[0]}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
    fig.suptitle("SD-architecture VAE, fp32, CPU (2 cores): untiled vs exact- and fast-tiled")
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
