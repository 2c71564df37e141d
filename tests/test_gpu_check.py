"""./dev.sh gpu-check where there is no GPU: a clear "no CUDA device" and exit status 3, without
installing anything; and a dry run of the whole script on the CPU (steps, budget, JSON and table)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.gpu_check import NO_CUDA, Budget, main, verdicts
from tests.support import cpu_runs_fp16

ROOT = Path(__file__).resolve().parents[1]


def _nvidia_present() -> bool:
    return (
        torch.cuda.is_available()
        or bool(list(Path("/dev").glob("nvidia[0-9]*")))
        or bool(shutil.which("nvidia-smi"))
    )


@pytest.mark.skipif(_nvidia_present(), reason="a CUDA machine would really install and run the check")
def test_dev_sh_gpu_check_says_no_cuda_device_and_installs_nothing(tmp_path):
    gpu_venv = tmp_path / "gpu-venv"
    env = {**os.environ, "VAEBATCH_GPU_VENV": str(gpu_venv)}
    proc = subprocess.run(
        ["bash", str(ROOT / "dev.sh"), "gpu-check"], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == NO_CUDA == 3
    assert "no CUDA device" in proc.stderr
    assert not gpu_venv.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch sees a CUDA device")
def test_the_script_itself_stops_at_no_cuda_device(capsys, tmp_path):
    assert main(["--out", str(tmp_path)]) == NO_CUDA
    assert "no CUDA device" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(
    not cpu_runs_fp16(),
    reason="the dry run's fp16 step needs fp16 kernels on the CPU, which this torch lacks (torch 2.1); "
    "the main stack runs it",
)
def test_dry_run_runs_every_step_on_the_cpu_and_writes_json_and_table(tmp_path, capsys):
    assert main(["--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    (js,) = tmp_path.glob("gpu-check-*-dry-run.json")
    (md,) = tmp_path.glob("gpu-check-*-dry-run.md")
    report = json.loads(js.read_text())
    assert set(report["steps"]) == {"decode_fp16", "decode_bf16", "tiled_vram", "offload"}
    assert all("result" in s for s in report["steps"].values()), report["steps"]
    fp16 = report["steps"]["decode_fp16"]["result"]
    assert set(fp16["median"]) == {"engine", "a1111_per_sample", "whole_batch"}
    assert fp16["engine_statuses"] == ["ok", "ok"]
    tiled = report["steps"]["tiled_vram"]["result"]["modes"]
    assert set(tiled) == {"exact", "fast", "untiled"}
    assert "tiled" in tiled["exact"]["summary"]
    assert {"cpu", "cores", "torch", "torch_threads", "load_average"} <= set(report["machine"])
    assert "| decode | dtype |" in md.read_text()
    assert "DRY-RUN (cpu, not a verdict) engine ≥ 1.5× A1111's loop at 512² b8 fp16" in out


def test_steps_are_skipped_when_the_budget_is_spent(tmp_path, capsys):
    # Started 10 minutes ago with an 8-minute budget: nothing may start.
    import time

    assert main(["--dry-run", "--out", str(tmp_path), "--started", str(time.time() - 600)]) == 0
    report = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert all(s.get("over_budget") for s in report["steps"].values())
    assert "skipped: " in capsys.readouterr().out


def test_budget_counts_from_the_start():
    now = [100.0]
    b = Budget(40.0, 480, clock=lambda: now[0])
    assert b.left() == 420 and b.allows(420) and not b.allows(421)


def _report(ratio: float | None, peak: float | None, status: str = "ok") -> dict:
    steps: dict = {}
    if ratio is not None:
        steps["decode_fp16"] = {"result": {"engine_vs_a1111": ratio}}
    if peak is not None:
        steps["tiled_vram"] = {"result": {"modes": {"exact": {"peak_gib": peak, "status": status}}}}
    else:
        steps["tiled_vram"] = {"skipped": "skipped: 3 s left"}
    return {"steps": steps}


def test_verdict_lines():
    assert verdicts(_report(1.62, 2.1)) == [
        ("PASS", "engine ≥ 1.5× A1111's loop at 512² b8 fp16: 1.62×"),
        ("PASS", "exact 2048² decode ≤ 2.5 GiB VRAM: 2.10 GiB"),
    ]
    lines = verdicts(_report(1.49, 2.71))
    assert [s for s, _ in lines] == ["FAIL", "FAIL"]
    assert lines[1][1].endswith("2.71 GiB")
    assert verdicts(_report(2.0, 1.0, status="failed"))[1][0] == "FAIL"
    missing = verdicts(_report(None, None))
    assert missing[0] == ("FAIL", "engine ≥ 1.5× A1111's loop at 512² b8 fp16: not measured (not run)")
    assert missing[1] == ("FAIL", "exact 2048² decode ≤ 2.5 GiB VRAM: not measured (skipped: 3 s left)")


def test_gpu_constraints_pin_the_same_versions_with_a_cuda_torch():
    cpu = (ROOT / "requirements/constraints.txt").read_text().splitlines()
    gpu = (ROOT / "requirements/constraints-gpu.txt").read_text().splitlines()
    pins = lambda lines: {ln for ln in lines if ln and not ln.startswith("#")}  # noqa: E731
    assert pins(cpu) - pins(gpu) == {"torch==2.13.0+cpu"}
    assert pins(gpu) - pins(cpu) == {"torch===2.13.0"}


def test_gpu_check_is_runnable_as_a_script():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench/gpu_check.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "Exit status" in proc.stdout
