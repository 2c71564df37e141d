"""Decode and encode under a real allocation limit: a child process whose address space is capped
(RLIMIT_AS, set after warm-up) below what the untiled run needs, so allocations really fail. Every
sample must come back, and the report must say which tiled mode produced it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lib_vaebatch.engine.decode import decode_latents
from lib_vaebatch.engine.encode import encode_pixels
from lib_vaebatch.engine.options import EngineOptions
from tests.support import psnr
from tests.tiling.limits import N, inputs, limit_backend

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux's"
)

#: glibc's defaults let freed blocks keep address space (per-thread arenas reserve 64 MiB each,
#: and the mmap threshold grows), which makes an address-space cap measure the allocator rather
#: than the decode. Fixed thresholds return freed large blocks at once, as a steady process does.
#: oneDNN keeps up to 1024 compiled kernels (one per convolution shape) whose code pages count
#: against the cap and grow over a job of varied tile shapes: that cache is the fixed overhead this
#: test keeps small, so the cap measures the decode's own memory.
MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": "131072",
    "MALLOC_TRIM_THRESHOLD_": "131072",
    "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "8",
}


#: The cap: this share of the tensor memory one untiled sample allocates (measured in the child,
#: after warm-up). It sits between what the lean schedules need and what the same schedules need
#: with their spilled values in memory. Measured on an AMD EPYC by raising the cap in 8 MiB steps,
#: one sample (MiB of address space; untiled tensors 88 decode, 53 encode, so the cap is 26 / 16):
#: decode exact-spill <= 8, recomputation 8-16, the spill schedule with values in memory 64-70,
#: untiled 80-96; encode exact-spill and recomputation <= 8, values in memory 40-48, untiled 48-64.
FRACTION = 0.3


def _child(op: str, budget: str, out: Path, spill: str = "spill") -> dict:
    spill_dir = out / "spill"
    spill_dir.mkdir()
    env = {**os.environ, **MALLOC_ENV, "PYTHONPATH": str(ROOT), "VAEBATCH_SPILL_DIR": str(spill_dir)}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.tiling.limit_child", op, str(FRACTION), budget, str(out), spill],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(spill_dir.iterdir()), "spill files are unlinked: nothing is left behind"
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def references():
    backend = limit_backend()
    with torch.no_grad():
        dec = decode_latents(backend, inputs("decode"), options=EngineOptions(tiling="never"))
        enc = encode_pixels(backend, inputs("encode"), options=EngineOptions(tiling="never"))
    return {"decode": dec.outputs, "encode": enc.outputs}


def _check(report: dict, out: Path, reference: list[torch.Tensor]) -> list[str]:
    assert report["in_memory_mode"] == "exact-spill"
    assert report["really_limited"], "the cap must be below the spilled values held in memory"
    statuses = [r["status"] for r in report["reports"]]
    assert statuses == ["ok"] * N, (statuses, [r["message"] for r in report["reports"]], report["events"])
    outputs = load_file(str(out / "outputs.safetensors"))
    modes = []
    for i, rep in enumerate(report["reports"]):
        got, want = outputs[f"s{i}"], reference[i]
        mode = rep["tile_mode"] or "untiled"
        modes.append(mode)
        assert got.shape == want.shape
        if mode in ("untiled", "exact", "exact-spill", "exact-lean"):
            assert (got - want).abs().max().item() <= 1e-3, mode
        elif mode == "fast":
            assert psnr(got, want) >= 30.0
        else:
            assert mode == "plain" and torch.isfinite(got).all()
        if mode != "untiled":
            assert rep["tiled"]
    return modes


def test_decode_under_a_real_limit_the_planner_sees(tmp_path, references):
    """The engine asks the OS for free memory (the cap included) and plans tiles within it; whole
    values that do not fit go to a spill file (outside the capped address space)."""
    report = _child("decode", "free", tmp_path)
    modes = _check(report, tmp_path, references["decode"])
    assert all(m in ("exact", "exact-spill") for m in modes), (modes, report["events"])
    assert "exact-spill" in modes, "the cap is below the whole values: some must be spilled"
    assert not any("out of memory at chunk" in e for e in report["events"]), "planned, not failed into"
    assert "tiled ×2" in report["summary"]


def test_decode_under_a_real_limit_the_planner_is_not_told(tmp_path, references):
    """A budget far above the cap: the untiled decode really fails, and the engine steps down its
    ladder on real allocation failures until every sample is decoded; the exact rungs come first,
    and the leanest of them (spilling) fits under the cap, so no sample needs an inexact mode."""
    report = _child("decode", str(8 << 30), tmp_path)
    events = report["events"]
    assert any("out of memory at chunk 1" in e for e in events), events
    assert any("retrying exact within" in e for e in events), events
    modes = _check(report, tmp_path, references["decode"])
    assert modes == ["exact-spill"] * N, (modes, events)


def test_encode_under_a_real_limit_without_spilling(tmp_path, references):
    """Spilling off: the encoder's whole values that do not fit are recomputed instead."""
    report = _child("encode", "free", tmp_path, spill="nospill")
    modes = _check(report, tmp_path, references["encode"])
    assert all(m in ("exact", "exact-lean") for m in modes), (modes, report["events"])
