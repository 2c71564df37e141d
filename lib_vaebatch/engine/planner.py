"""Chunk planning from a per-pixel memory model and the device's free memory."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lib_vaebatch.backends.base import Op, VAEBackend
from lib_vaebatch.devices import free_memory
from lib_vaebatch.engine.options import EngineOptions


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def estimate_bytes(backend: VAEBackend, op: Op, pixels: int, dtype: torch.dtype) -> int:
    """Planned peak working memory of one sample in a chunk: activations per pixel, plus the
    mid-block attention's score matrix in case the attention kernel materialises it (a fixed amount
    per call, ``backend.fixed_bytes``, comes on top once per chunk). Where a chunk of this shape
    was measured (CUDA), the measurement is used instead."""
    measured = measured_bytes_per_pixel(backend, op, pixels, dtype)
    size = dtype_bytes(dtype)
    if measured is not None:
        return int(measured * pixels * size)
    tokens = backend.attention_tokens(op, pixels)
    return int(backend.bytes_per_pixel(op) * pixels * size + tokens * tokens * size)


# Measured peak bytes per pixel and byte of dtype, per backend, op, shape and dtype.
_MEASURED: dict[tuple[int, str, int, torch.dtype], float] = {}


def measured_bytes_per_pixel(
    backend: VAEBackend, op: Op, pixels: int, dtype: torch.dtype | None = None
) -> float | None:
    return _MEASURED.get((id(backend), op, pixels, dtype or backend.dtype))


def record_measurement(backend: VAEBackend, op: Op, pixels: int, chunk: int, peak_bytes: int) -> None:
    """Keep a measured peak (allocated bytes over a chunk of ``chunk`` samples) for planning; the
    fixed per-call part is kept out, and the model's estimate stays a floor."""
    size = dtype_bytes(backend.dtype)
    per_sample = max(0, peak_bytes - backend.fixed_bytes(op)) / max(1, chunk)
    _MEASURED[(id(backend), op, pixels, backend.dtype)] = per_sample / (pixels * size)


@dataclass(frozen=True)
class Plan:
    chunk: int
    per_sample_bytes: int
    fixed_bytes: int
    budget_bytes: int
    reason: str

    @property
    def planned_bytes(self) -> int:
        return self.chunk * self.per_sample_bytes + self.fixed_bytes

    @property
    def over_budget(self) -> bool:
        """One sample alone is planned to need more than the budget (a case for tiling)."""
        return self.per_sample_bytes + self.fixed_bytes > self.budget_bytes


def memory_budget(backend: VAEBackend, options: EngineOptions) -> int:
    """The bytes a chunk may plan for: the given budget, else a share of free memory as the host's
    memory manager sees it (Forge, ComfyUI) or as the device reports it. On the CPU a host's view
    is the machine's available RAM; the process's own limits (an address-space cap, a cgroup) are
    only in the device's view, so the smaller of the two counts."""
    if options.memory_budget is not None:
        return int(options.memory_budget)
    free = backend.free_bytes()
    if free is None:
        free = free_memory(backend.device)
    elif backend.device.type == "cpu":
        free = min(free, free_memory(backend.device))
    return int(free * options.memory_fraction)


def plan_chunk(
    backend: VAEBackend,
    op: Op,
    pixels: int,
    remaining: int,
    options: EngineOptions,
    *,
    cap: int | None = None,
) -> Plan:
    """How many samples to run at once.

    ``pixels`` is per sample: output pixels for decode, input pixels for encode. ``cap`` is a limit
    learnt during the job (after an out-of-memory error).
    """
    per = max(1, estimate_bytes(backend, op, pixels, backend.dtype))
    fixed = backend.fixed_bytes(op)
    budget = memory_budget(backend, options)
    if options.chunk_mode == "per-sample":
        return Plan(1, per, fixed, budget, "per-sample mode")
    limits = {"memory": max(1, (budget - fixed) // per), "remaining": max(1, remaining)}
    if (eff := backend.max_efficient_chunk(op)) is not None:
        limits["throughput"] = eff
    if options.max_chunk is not None:
        limits["user maximum"] = options.max_chunk
    if cap is not None:
        limits["after out-of-memory"] = cap
    reason, chunk = min(limits.items(), key=lambda kv: kv[1])
    return Plan(int(chunk), per, fixed, budget, f"limited by {reason}")
