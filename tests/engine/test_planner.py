from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lib_vaebatch.backends import ApproxVAE
from lib_vaebatch.devices import (
    dtype_name,
    dtype_supported,
    free_memory,
    is_oom,
    parse_dtype,
    robustness,
)
from lib_vaebatch.engine.options import EngineOptions
from lib_vaebatch.engine.planner import estimate_bytes, plan_chunk
from tests.support import Recorder, cpu_runs_fp16, tiny_backend


@pytest.fixture(scope="module")
def vae():
    return Recorder(tiny_backend())  # lets memory decide the chunk


@given(
    budget=st.integers(1, 1 << 40),
    remaining=st.integers(1, 500),
    user=st.none() | st.integers(1, 64),
    cap=st.none() | st.integers(1, 64),
    side=st.integers(1, 256),
)
def test_chunk_respects_every_bound(vae, budget, remaining, user, cap, side):
    opts = EngineOptions(max_chunk=user, memory_budget=budget)
    pixels = (side * 8) ** 2
    plan = plan_chunk(vae, "decode", pixels, remaining, opts, cap=cap)
    per = estimate_bytes(vae, "decode", pixels, torch.float32)
    assert 1 <= plan.chunk <= remaining
    assert plan.chunk <= (user or remaining) and plan.chunk <= (cap or remaining)
    fixed = vae.fixed_bytes("decode")
    assert plan.chunk == 1 or plan.chunk * per + fixed <= budget
    assert plan.planned_bytes == plan.chunk * per + fixed
    assert plan.over_budget == (per + fixed > budget)


def test_more_memory_never_means_smaller_chunks(vae):
    sizes = [
        plan_chunk(vae, "decode", 512 * 512, 64, EngineOptions(memory_budget=b)).chunk
        for b in (1 << 28, 1 << 31, 1 << 34, 1 << 37)
    ]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]


def test_fp16_plans_twice_the_chunk_of_fp32(vae):
    budget = 40 * estimate_bytes(vae, "decode", 256 * 256, torch.float32)
    a = plan_chunk(vae, "decode", 256 * 256, 1000, EngineOptions(memory_budget=budget)).chunk
    vae.set_dtype(torch.float16)
    try:
        b = plan_chunk(vae, "decode", 256 * 256, 1000, EngineOptions(memory_budget=budget)).chunk
    finally:
        vae.set_dtype(torch.float32)
    assert b >= 2 * a - 1


@pytest.mark.usefixtures("cpu_chunks_by_memory")
def test_per_sample_mode_and_memory_alone_on_cpu():
    real = tiny_backend()  # batching pays on the CPU too (issue 13): no throughput cap there
    plan = plan_chunk(real, "decode", 64 * 64, 8, EngineOptions(memory_budget=1 << 40))
    assert plan.chunk == 8 and plan.reason == "limited by remaining"
    assert plan_chunk(ApproxVAE(), "decode", 64 * 64, 8, EngineOptions(memory_budget=1 << 40)).chunk == 8
    plan = plan_chunk(ApproxVAE(), "decode", 64 * 64, 8, EngineOptions(chunk_mode="per-sample"))
    assert plan.chunk == 1 and plan.reason == "per-sample mode"


def test_free_memory_on_cpu_is_available_ram():
    free = free_memory(torch.device("cpu"))
    with open("/proc/meminfo") as f:
        total = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) * 1024
    assert 0 < free <= total


def test_a_hosts_view_of_cpu_memory_is_capped_by_the_processs_own_limits(monkeypatch):
    """Forge's and ComfyUI's memory managers report the machine's available RAM for the CPU; an
    address-space cap or a cgroup limit is only in our own view, and the smaller one plans."""
    from lib_vaebatch.engine import planner

    class HostManaged(Recorder):
        def free_bytes(self) -> int:
            return 64 << 30

    backend = HostManaged(tiny_backend())
    monkeypatch.setattr(planner, "free_memory", lambda device: 500 << 20)
    assert planner.memory_budget(backend, EngineOptions()) == int((500 << 20) * 0.8)
    monkeypatch.setattr(planner, "free_memory", lambda device: 128 << 30)
    assert planner.memory_budget(backend, EngineOptions()) == int((64 << 30) * 0.8)


def test_oom_detection_covers_backend_error_types():
    assert is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_oom(
        RuntimeError("[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: can't allocate memory: you tried")
    )
    assert is_oom(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert is_oom(MemoryError())
    assert not is_oom(RuntimeError("shape mismatch"))
    assert not is_oom(ValueError("out of memory"))


def test_dtype_names_and_ladder_order():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("torch.float16") is torch.float16
    assert dtype_name(torch.float32) == "fp32"
    assert robustness(torch.float16) < robustness(torch.bfloat16) < robustness(torch.float32)
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("fp8")


def test_dtype_support_on_the_cpu_is_what_its_kernels_run():
    """torch 2.1 (A1111 1.10.1's) has no fp16 conv/GroupNorm/upsampling on the CPU: fp16 must not be
    offered there (the CLI and the app refuse it, the ladder skips it); later releases run it."""
    cpu = torch.device("cpu")
    assert dtype_supported(cpu, torch.float16) is cpu_runs_fp16()
    assert dtype_supported(cpu, torch.bfloat16) and dtype_supported(cpu, torch.float32)
    assert dtype_supported(cpu, torch.float64) and not dtype_supported(cpu, torch.int8)


def test_options_validate_and_take_names():
    assert EngineOptions.from_mapping({"ladder": "bf16, fp32", "max_chunk": 4}).ladder == ("bf16", "fp32")
    with pytest.raises(ValueError, match="unknown engine option"):
        EngineOptions.from_mapping({"chunks": 3})
    with pytest.raises(ValueError, match="tile_size"):
        EngineOptions(tile_size=4)
    with pytest.raises(ValueError, match="unknown dtype"):
        EngineOptions(ladder=("fp8",))
