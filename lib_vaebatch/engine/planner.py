"""Chunk planning from a per-pixel memory model and the device's free memory."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lib_vaebatch.backends.base import Op, VAEBackend
from lib_vaebatch.engine.devices import free_memory
from lib_vaebatch.engine.options import EngineOptions


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def estimate_bytes(backend: VAEBackend, op: Op, pixels: int, dtype: torch.dtype) -> int:
    """Planned peak working memory of one sample in a chunk: activations per pixel, plus the
    mid-block attention's score matrix in case the attention kernel materialises it. (A fixed
    amount per call, ``backend.fixed_bytes``, comes on top once per chunk.)"""
    size = dtype_bytes(dtype)
    tokens = backend.attention_tokens(op, pixels)
    return int(backend.bytes_per_pixel(op) * pixels * size + tokens * tokens * size)


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
    if options.memory_budget is not None:
        return int(options.memory_budget)
    return int(free_memory(backend.device) * options.memory_fraction)


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
