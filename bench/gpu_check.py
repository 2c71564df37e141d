"""One command for a CUDA machine (``./dev.sh gpu-check``, issue 13): the gpu-marked tests, then a
short benchmark of the GPU targets, with a verdict line per target, in under 8 minutes.

Steps, each skipped with a message when the 8-minute budget (counted from ``--started``, which
dev.sh sets before it installs anything) would not leave it enough time:

1. ``pytest -m gpu`` (the CUDA paths: pinned staging, overlap, recovery, calibration).
2. Decode at 512², batch 8, fp16 and bf16: the engine at its defaults, A1111's per-sample loop
   (bench/baselines.py) and one whole-batch decode; median of 3, methods interleaved.
3. Peak VRAM of a 2048² decode tiled in each mode (exact, fast), planned for a 2 GiB budget; the
   untiled peak for reference.
4. The engine with pinned, overlapped offload on and off (512², batch 8, chunks of 2).

The VAE is the SD architecture with random weights (bench/common.py). Writes
bench/results/gpu-check-<UTC time>.json and .md and prints, last, one line per target:

    PASS engine ≥ 1.5× A1111's loop at 512² b8 fp16: 1.62×
    FAIL exact 2048² decode ≤ 2.5 GiB VRAM: 2.71 GiB

Exit status: 0 every target passed; 1 a target failed, or a step errored or was skipped; 2 bad
arguments; 3 no CUDA device (nothing is run). ``--dry-run`` runs the same steps on the CPU at toy
sizes with a tiny VAE (no tests, no verdicts), to check the script itself where no GPU is.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUDGET_S = 8 * 60
NO_CUDA = 3
SPEED_TARGET = 1.5  # engine vs A1111's loop, 512² b8 fp16
VRAM_TARGET_GIB = 2.5  # exact-tiled 2048² decode
TILE_BUDGET = 2 << 30  # what the tile planner may plan for in step 3


class Budget:
    """Seconds left of the whole command's budget; steps ask before they start."""

    def __init__(self, started: float, total: float, clock: Callable[[], float] = time.time) -> None:
        self.started, self.total, self.clock = started, total, clock

    def left(self) -> float:
        return self.total - (self.clock() - self.started)

    def allows(self, need: float) -> bool:
        return self.left() >= need


def _gib(n: float) -> float:
    return n / 2**30


# -- steps -------------------------------------------------------------------------------------
def step_tests(budget: Budget) -> dict[str, Any]:
    timeout = max(30.0, min(240.0, budget.left() - 150))
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"ok": False, "summary": f"timed out after {timeout:.0f} s"}
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    summary = tail[-1] if tail else ""
    return {"ok": proc.returncode == 0, "returncode": proc.returncode, "summary": summary, "tail": tail[-30:]}


def step_decode(vae: Any, device: Any, size: int, batch: int, repeats: int) -> dict[str, Any]:
    import torch

    from bench.baselines import a1111_decode_latent_batch
    from bench.common import median, timed
    from lib_vaebatch.engine.decode import decode_latents
    from lib_vaebatch.families import to_raw

    statuses: list[str] = []

    def engine(lat: torch.Tensor) -> object:
        result = decode_latents(vae, lat)
        statuses[:] = [r.status.value for r in result.reports]
        return result

    def a1111(lat: torch.Tensor) -> object:
        return a1111_decode_latent_batch(vae, lat)

    def whole(lat: torch.Tensor) -> object:
        with torch.no_grad():
            z = to_raw(lat.to(device, vae.dtype), vae.scaling_factor, vae.shift_factor)
            return vae.decode(z).to("cpu")

    fns = {"engine": engine, "a1111_per_sample": a1111, "whole_batch": whole}
    lat = torch.randn(
        batch, vae.latent_channels, size // 8, size // 8, generator=torch.Generator().manual_seed(0)
    )
    for fn in fns.values():
        fn(lat[:2])  # first-call costs and cuDNN autotuning out of the measurement
    times: dict[str, list[float]] = {m: [] for m in fns}
    names = list(fns)
    for r in range(repeats):
        for m in names[r % len(names) :] + names[: r % len(names)]:
            times[m].append(timed(lambda m=m: fns[m](lat), device))
    med = {m: median(t) for m, t in times.items()}
    return {
        "size": size,
        "batch": batch,
        "dtype": str(vae.dtype).removeprefix("torch."),
        "times": times,
        "median": med,
        "engine_vs_a1111": med["a1111_per_sample"] / med["engine"],
        "engine_vs_whole": med["whole_batch"] / med["engine"],
        "engine_statuses": statuses,
    }


def step_tiled_vram(vae: Any, device: Any, size: int, budget_bytes: int) -> dict[str, Any]:
    import torch

    from lib_vaebatch.engine.decode import decode_latents
    from lib_vaebatch.engine.options import EngineOptions

    lat = torch.randn(
        1, vae.latent_channels, size // 8, size // 8, generator=torch.Generator().manual_seed(0)
    )
    out: dict[str, Any] = {"size": size, "planner_budget_bytes": budget_bytes, "modes": {}}
    for mode in ("exact", "fast", "untiled"):
        tiling = "never" if mode == "untiled" else "always"
        opts = EngineOptions(
            tiling=tiling, tile_mode="exact" if mode == "untiled" else mode, memory_budget=budget_bytes
        )
        peak, seconds, result = _peak(
            device, lambda opts=opts: decode_latents(vae, lat, options=opts, keep_outputs=False)
        )
        out["modes"][mode] = {
            "peak_bytes": peak,
            "peak_gib": _gib(peak) if peak is not None else None,
            "seconds": seconds,
            "status": result.reports[0].status.value,
            "summary": result.summary(),
            "events": result.events[-5:],
        }
    return out


def _peak(device: Any, fn: Callable[[], Any]) -> tuple[int | None, float, Any]:
    """Peak allocated bytes during ``fn`` (weights included: what the card must hold), its time."""
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak: int | None = int(torch.cuda.max_memory_allocated(device))
    else:
        peak = None
    return peak, time.perf_counter() - start, result


def step_offload(vae: Any, device: Any, size: int, batch: int, repeats: int) -> dict[str, Any]:
    import torch

    from bench.common import median, timed
    from lib_vaebatch.engine.decode import decode_latents
    from lib_vaebatch.engine.options import EngineOptions

    lat = torch.randn(
        batch, vae.latent_channels, size // 8, size // 8, generator=torch.Generator().manual_seed(1)
    )
    variants = {
        "overlapped": EngineOptions(max_chunk=2, overlap_offload=True),
        "synchronous": EngineOptions(max_chunk=2, overlap_offload=False),
    }
    for opts in variants.values():
        decode_latents(vae, lat[:2], options=opts)
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(repeats):
        for k in names[r % 2 :] + names[: r % 2]:
            times[k].append(timed(lambda k=k: decode_latents(vae, lat, options=variants[k]), device))
    med = {k: median(t) for k, t in times.items()}
    return {
        "size": size,
        "batch": batch,
        "chunk": 2,
        "times": times,
        "median": med,
        "overlapped_vs_synchronous": med["synchronous"] / med["overlapped"],
    }


# -- the run -----------------------------------------------------------------------------------
def verdicts(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(state, line) per target: PASS, FAIL or SKIP (the step did not run or errored)."""
    out: list[tuple[str, str]] = []
    what = f"engine ≥ {SPEED_TARGET:g}× A1111's loop at 512² b8 fp16"
    fp16 = report["steps"].get("decode_fp16", {})
    if "result" in fp16:
        x = fp16["result"]["engine_vs_a1111"]
        out.append(("PASS" if x >= SPEED_TARGET else "FAIL", f"{what}: {x:.2f}×"))
    else:
        out.append(("FAIL", f"{what}: not measured ({fp16.get('skipped') or fp16.get('error', 'not run')})"))
    what = f"exact 2048² decode ≤ {VRAM_TARGET_GIB:g} GiB VRAM"
    tiled = report["steps"].get("tiled_vram", {})
    exact = tiled.get("result", {}).get("modes", {}).get("exact")
    if exact and exact["peak_gib"] is not None:
        ok = exact["peak_gib"] <= VRAM_TARGET_GIB and exact["status"] == "ok"
        out.append(("PASS" if ok else "FAIL", f"{what}: {exact['peak_gib']:.2f} GiB"))
    else:
        out.append(
            ("FAIL", f"{what}: not measured ({tiled.get('skipped') or tiled.get('error', 'not run')})")
        )
    return out


def markdown(report: dict[str, Any], lines: list[tuple[str, str]]) -> str:
    m = report["machine"]
    md = [
        f"# gpu-check {report['started_utc']}",
        "",
        (
            f"{m.get('gpu', 'no GPU')} (CUDA {m.get('cuda')}), torch {m['torch']}, {m['cpu']}, "
            f"{report['wall_s']:.0f} s{' (dry run on the CPU)' if report['dry_run'] else ''}."
        ),
        "",
        *(f"- **{state}** {line}" for state, line in lines),
        "",
    ]
    steps = report["steps"]
    tests = steps.get("tests", {})
    if "result" in tests:
        md += [f"Tests (`pytest -m gpu`): {tests['result']['summary']}", ""]
    decode = [steps[k]["result"] for k in ("decode_fp16", "decode_bf16") if "result" in steps.get(k, {})]
    if decode:
        md += [
            "| decode | dtype | engine s | A1111 loop s | whole batch s | engine / A1111 | engine / whole |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for d in decode:
            t = d["median"]
            md.append(
                f"| {d['size']}² b{d['batch']} | {d['dtype']} | {t['engine']:.3f} "
                f"| {t['a1111_per_sample']:.3f} "
                f"| {t['whole_batch']:.3f} | {d['engine_vs_a1111']:.2f}× | {d['engine_vs_whole']:.2f}× |"
            )
        md.append("")
    tiled = steps.get("tiled_vram", {}).get("result")
    if tiled:
        md += ["| 2048² decode | peak allocated | time | status |", "|---|---:|---:|---|"]
        for mode, r in tiled["modes"].items():
            peak = f"{r['peak_gib']:.2f} GiB" if r["peak_gib"] is not None else "n/a"
            md.append(f"| {mode} | {peak} | {r['seconds']:.2f} s | {r['summary']} |")
        md.append("")
    off = steps.get("offload", {}).get("result")
    if off:
        t = off["median"]
        md += [
            (
                f"Offload ({off['size']}² b{off['batch']}, chunks of {off['chunk']}): "
                f"overlapped {t['overlapped']:.3f} s, "
                f"synchronous {t['synchronous']:.3f} s ({off['overlapped_vs_synchronous']:.2f}×)."
            ),
            "",
        ]
    for name, step in steps.items():
        if "skipped" in step or "error" in step:
            md.append(f"- {name}: {step.get('skipped') or step.get('error')}")
    return "\n".join(md).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--started", type=float, default=None, help="epoch seconds the budget counts from")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole command")
    ap.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at toy sizes")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    ap.add_argument("--no-tests", action="store_true", help="skip pytest -m gpu")
    args = ap.parse_args(argv)
    budget = Budget(args.started if args.started is not None else time.time(), args.budget)

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        why = (
            f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but sees no device "
            "(no GPU, or a driver older than that CUDA)"
            if torch.version.cuda
            else f"torch {torch.__version__} is a CPU build"
        )
        print(f"gpu-check: no CUDA device: {why}; nothing was run", file=sys.stderr)
        return NO_CUDA

    from bench.common import RESULTS, machine, sd_vae, tiny_vae

    device = torch.device("cpu") if args.dry_run else torch.device("cuda", torch.cuda.current_device())
    started = datetime.now(timezone.utc)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    report: dict[str, Any] = {
        "benchmark": "gpu-check",
        "started_utc": started.isoformat(timespec="seconds"),
        "dry_run": args.dry_run,
        "machine": machine(),
        "budget_s": args.budget,
        "steps": {},
    }
    # Toy sizes for the dry run, the real ones on a GPU; each step's number is the time it must have
    # left to start.
    size, batch, big, repeats = (64, 2, 256, 1) if args.dry_run else (512, 8, 2048, 3)

    def make(dtype: Any) -> Any:
        return (
            tiny_vae(device=str(device), dtype=dtype)
            if args.dry_run
            else sd_vae(device=str(device), dtype=dtype)
        )

    def bf16_ok() -> bool:
        return args.dry_run or torch.cuda.is_bf16_supported()

    plan: list[tuple[str, float, Callable[[], dict[str, Any]]]] = []
    if not (args.dry_run or args.no_tests):
        plan.append(("tests", 120, lambda: step_tests(budget)))
    plan += [
        ("decode_fp16", 60, lambda: step_decode(make(torch.float16), device, size, batch, repeats)),
        (
            "decode_bf16",
            60,
            lambda: (
                step_decode(make(torch.bfloat16), device, size, batch, repeats)
                if bf16_ok()
                else {"skipped": "bf16 is not native on this GPU"}
            ),
        ),
        ("tiled_vram", 60, lambda: step_tiled_vram(make(torch.float16), device, big, TILE_BUDGET)),
        ("offload", 40, lambda: step_offload(make(torch.float16), device, size, batch, repeats)),
    ]
    t0 = time.perf_counter()
    for name, need, fn in plan:
        if not budget.allows(need):
            msg = (
                f"skipped: {budget.left():.0f} s left of the {args.budget:.0f} s budget, "
                f"this step needs ~{need:.0f} s"
            )
            print(f"[gpu-check] {name}: {msg}", flush=True)
            report["steps"][name] = {"skipped": msg, "over_budget": True}
            continue
        print(f"[gpu-check] {name} ({budget.left():.0f} s left) ...", flush=True)
        s0 = time.perf_counter()
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - one failed step must not lose the others' results
            report["steps"][name] = {
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
            }
            print(f"[gpu-check] {name}: {type(exc).__name__}: {exc}", flush=True)
        else:
            entry = {"skipped": result["skipped"]} if "skipped" in result else {"result": result}
            report["steps"][name] = {**entry, "seconds": time.perf_counter() - s0}
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    report["wall_s"] = time.perf_counter() - t0
    lines = verdicts(report)
    tests = report["steps"].get("tests", {})
    out_dir = args.out or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"gpu-check-{stamp}{'-dry-run' if args.dry_run else ''}"
    report["verdicts"] = [f"{s} {line}" for s, line in lines]
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out_dir / f"{name}.md").write_text(markdown(report, lines))
    print(f"wrote {out_dir / name}.json and .md")
    if "result" in tests:
        print(f"{'PASS' if tests['result']['ok'] else 'FAIL'} gpu tests: {tests['result']['summary']}")
    if args.dry_run:
        for _state, line in lines:
            print(f"DRY-RUN (cpu, not a verdict) {line}")
        errors = [n for n, s in report["steps"].items() if "error" in s]
        return 1 if errors else 0
    for state, line in lines:
        print(f"{state} {line}")
    failed = any(s != "PASS" for s, _ in lines) or any(
        "error" in s or s.get("over_budget") for s in report["steps"].values()
    )
    if "result" in tests and not tests["result"]["ok"]:
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
