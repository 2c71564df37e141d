"""Tiled decode and encode whose output matches the untiled one, in memory bounded by the tile.

``exact`` mode runs the VAE one step at a time over the whole image in tiles, with GroupNorm
statistics gathered from all tile cores: the result equals the untiled forward up to float rounding.
Where whole values do not fit the budget, they are kept in a spill store (host memory for a CUDA
run, a temporary file for a CPU run: "exact-spill", :mod:`lib_vaebatch.tiling.spill`), or parts of
the program are recomputed from lower-resolution values kept whole instead ("exact-lean",
:mod:`lib_vaebatch.tiling.lean`). ``fast`` mode runs the
high-resolution stage as independent tiles with estimated statistics (see
:mod:`lib_vaebatch.tiling.fast`). ``auto`` takes exact where it fits the budget, else fast. ``plain``
is the peers' method, independent tiles blended over an overlap (:mod:`lib_vaebatch.tiling.plain`):
the engine's last resort, never exact. All call the module's own layers, in diffusers or
ldm/sgm/SD3 layout (:mod:`lib_vaebatch.tiling.program`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch

from lib_vaebatch.heap import HeapGuard
from lib_vaebatch.tiling.exact import TileCancel, TileProgress, TilingCancelledError, _base_hw
from lib_vaebatch.tiling.fast import default_segment, lean_segment_plan, run_fast
from lib_vaebatch.tiling.lean import SPILL_MACS_PER_BYTE, WORKSPACE_FACTOR, Schedule, run_lean, schedule
from lib_vaebatch.tiling.plain import run_plain
from lib_vaebatch.tiling.plan import (
    DEFAULT_WORKSPACE_FACTOR,
    LIVE_SLACK,
    MIN_TILE,
    calibrate,
    calibration_factor,
    estimate_peak,
    fast_segment_peak,
    lockstep_tile_elements,
    step_transient,
)
from lib_vaebatch.tiling.program import Program, TilingUnsupportedError, decoder_program, encoder_program
from lib_vaebatch.tiling.spill import SpillError, SpillStore, default_store

__all__ = [
    "FIXED_OVERHEAD",
    "MIN_TILE",
    "TILE_MODES",
    "Program",
    "SpillError",
    "SpillStore",
    "TileSettings",
    "TilingCancelledError",
    "TilingUnsupportedError",
    "decoder_program",
    "default_store",
    "encoder_program",
    "estimate_peak",
    "minimum_budget",
    "run_tiled",
]

TileMode = Literal["exact", "exact-lean", "fast", "auto", "plain"]
#: ``exact-lean``: exact, never spilling (recomputation where whole values do not fit)
TILE_MODES: tuple[str, ...] = ("exact", "exact-lean", "fast", "auto", "plain")
#: Tile sizes the planner tries (latent pixels), largest first.
TILE_CANDIDATES = (32, 24, 16, 12, 8)
#: Bytes a tiled call takes beyond the tensors the planner models (oneDNN's scratch and reordered
#: weights, the allocator's rounding and fragmentation, statistics, Python objects): measured peaks
#: (peak RSS, CPU, 512² to 2048², bench/bench_lean.py) came out up to ~60 MiB above the modelled
#: ones. Every planned peak includes it, so a budget below it is below the minimum.
FIXED_OVERHEAD = 64 << 20
#: Plain tiles: sizes tried, largest first (ComfyUI's single pass uses 64 with an overlap of 16).
PLAIN_CANDIDATES = (64, 48, 32, 24, 16, 12, 8)


@dataclass
class TileSettings:
    """How to tile one call: mode, tile size in latent pixels (None: planned from ``budget``),
    ``max_tile`` a cap learnt from an out-of-memory error (it wins over a given or planned size),
    ``leanest`` the schedule with the lowest planned peak whatever it costs (a rung of the engine's
    out-of-memory ladder), ``spill`` where exact schedules may keep whole values that do not fit
    (None: nowhere). After the call, ``used_tile``, ``used_mode`` ("exact", "exact-spill",
    "exact-lean", "fast" or "plain"), ``planned_bytes`` and ``spilled_bytes`` say what ran, and
    ``least_bytes`` the lowest planned peak of that mode for the input (the leanest variant)."""

    mode: TileMode = "exact"
    tile_size: int | None = None
    budget: int | None = None
    progress: TileProgress | None = None
    cancel: TileCancel | None = None
    max_tile: int | None = None
    leanest: bool = False
    spill: SpillStore | None = None
    used_tile: int | None = None
    used_mode: str | None = None
    planned_bytes: int | None = None
    spilled_bytes: int | None = None
    least_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in TILE_MODES:
            raise ValueError(f"tile mode must be one of {', '.join(TILE_MODES)}, not {self.mode!r}")
        for name in ("tile_size", "max_tile"):
            value = getattr(self, name)
            if value is not None and value < MIN_TILE:
                raise ValueError(f"tile size is in latent pixels and must be >= {MIN_TILE}, not {value}")


@dataclass
class TilePlan:
    mode: str  # "exact", "exact-spill", "exact-lean", "fast" or "plain"
    tile: int
    planned_bytes: int
    spilled_bytes: int = 0
    schedule: Schedule | None = None  # exact
    segment: tuple[int, int] | None = None  # fast
    prefix: Schedule | None = None  # fast
    suffix: Schedule | None = None  # fast
    lean: bool = False  # fast: the stage itself through the spill store
    resident: int = 0  # lean fast: sample tiles whose slabs stay in memory (the rest are parked)


def _candidates(settings: TileSettings, base: tuple[int, int], sizes: tuple[int, ...]) -> list[int]:
    side = max(base)
    if settings.tile_size is not None:
        tiles = [settings.tile_size]
    else:
        tiles = [t for t in sizes if t < side] + [min(side, sizes[0])]
    if settings.max_tile is not None:
        tiles = [min(t, settings.max_tile) for t in tiles]
    return sorted({max(MIN_TILE, t) for t in tiles}, reverse=True)


def _pick(plans: list[TilePlan], costs: list[float], budget: int | None, leanest: bool) -> TilePlan:
    """The cheapest plan within the budget, else (or with ``leanest``) the one with the lowest peak."""
    if budget is None and not leanest:
        return plans[0]
    fits = [k for k, p in enumerate(plans) if budget is not None and p.planned_bytes <= budget]
    if fits and not leanest:
        return plans[min(fits, key=lambda k: (costs[k], -plans[k].tile))]
    return plans[min(range(len(plans)), key=lambda k: (plans[k].planned_bytes, costs[k]))]


def _plan_exact(program: Program, base: tuple[int, int], settings: TileSettings, batch: int,
                dtype: torch.dtype, factor: float | None) -> TilePlan:  # fmt: skip
    plans, costs = [], []
    spill = settings.spill.limit if settings.spill is not None else None
    for tile in _candidates(settings, base, TILE_CANDIDATES):
        s = schedule(program, base, tile, budget=settings.budget, batch=batch, dtype=dtype,
                     leanest=settings.leanest, factor=factor or WORKSPACE_FACTOR, spill=spill)  # fmt: skip
        plans.append(TilePlan(s.label, tile, s.peak, s.spilled, schedule=s))
        costs.append(s.cost)
    return _pick(plans, costs, settings.budget, settings.leanest)


def _plan_fast(program: Program, base: tuple[int, int], settings: TileSettings, batch: int,
               dtype: torch.dtype, factor: float | None) -> TilePlan:  # fmt: skip
    first, last = default_segment(program)
    size = torch.empty((), dtype=dtype).element_size()
    f = factor or DEFAULT_WORKSPACE_FACTOR
    plans, costs = [], []
    for tile in _candidates(settings, base, TILE_CANDIDATES):
        kw = {"budget": settings.budget, "batch": batch, "dtype": dtype, "leanest": settings.leanest,
              "spill": settings.spill.limit if settings.spill is not None else None}  # fmt: skip
        prefix = schedule(program, base, tile, end=first, **kw)  # type: ignore[arg-type]
        suffix = schedule(program, base, tile, start=last, **kw)  # type: ignore[arg-type]
        seg = int(fast_segment_peak(program, base, tile, batch, first, last, f) * size)
        peak = max(prefix.peak, suffix.peak, seg)
        spilled = max(prefix.spilled, suffix.spilled)
        plans.append(TilePlan("fast", tile, peak, spilled, segment=(first, last), prefix=prefix,
                              suffix=suffix))  # fmt: skip
        costs.append(prefix.cost + suffix.cost)
        if settings.spill is not None:
            for p, cost in _lean_fast_plans(program, base, tile, batch, (first, last), size, f,
                                            prefix, suffix):  # fmt: skip
                plans.append(p)
                costs.append(cost)
    return _pick(plans, costs, settings.budget, settings.leanest)


def _lean_fast_plans(program: Program, base: tuple[int, int], tile: int, batch: int,
                     segment: tuple[int, int], size: int, factor: float, prefix: Schedule,
                     suffix: Schedule) -> list[tuple[TilePlan, float]]:  # fmt: skip
    """Lean fast plans (the stage through the spill store), with 0 up to every sample tile kept in
    memory instead of parked: each one kept costs its slabs and saves its share of the parking
    traffic (half the stage's full-resolution values, out and back, over all sample tiles)."""
    first, last = segment
    lean_peak, moved = lean_segment_plan(program, base, tile, batch, first, last, factor)
    elems = [math.prod(program_value_shape(program, base, v, batch)) for v in range(first, last + 1)]
    stored = max(prefix.spilled, suffix.spilled, (elems[0] + elems[-1]) * size)
    per_tile, n_sampled = lockstep_tile_elements(program, base, tile, batch, first, last)
    out = []
    for resident in sorted({0, n_sampled // 4, n_sampled // 2, 3 * n_sampled // 4, n_sampled}):
        peak = max(prefix.peak, suffix.peak, int((lean_peak + LIVE_SLACK * resident * per_tile) * size))
        moved_k = moved - resident / max(1, n_sampled) * sum(elems) / 2
        plan = TilePlan("fast", tile, peak, stored, segment=segment, prefix=prefix, suffix=suffix, lean=True,
                        resident=resident)  # fmt: skip
        out.append((plan, prefix.cost + suffix.cost + SPILL_MACS_PER_BYTE * size * moved_k))
    return out


def program_value_shape(program: Program, base: tuple[int, int], value: int, batch: int) -> tuple[int, ...]:
    f = program.factor(value)
    return (batch, program.channels[value], base[0] * f, base[1] * f)


def _plan_plain(program: Program, base: tuple[int, int], settings: TileSettings, batch: int,
                dtype: torch.dtype) -> TilePlan:  # fmt: skip
    f_out = program.factor(len(program.steps))
    out_bytes = 4 * batch * (program.out_channels + 1) * base[0] * base[1] * f_out * f_out
    plans, costs = [], []
    for tile in _candidates(settings, base, PLAIN_CANDIDATES):
        crop = (min(tile, base[0]), min(tile, base[1]))
        whole = schedule(program, crop, max(crop), batch=batch, dtype=dtype)
        # the tile's output in float32 and its weighted copy come on top of its run
        tile_out = 2 * 4 * batch * program.out_channels * crop[0] * crop[1] * f_out * f_out
        plans.append(TilePlan("plain", tile, whole.peak + out_bytes + tile_out))
        costs.append(-tile)
    return _pick(plans, costs, settings.budget, settings.leanest)


def plan(program: Program, x: torch.Tensor, settings: TileSettings, key: object = None) -> TilePlan:
    """What to run for ``x``: mode, tile size and schedule, within ``settings.budget`` where any
    variant of the mode fits it (else the variant with the lowest planned peak). Planned peaks
    include :data:`FIXED_OVERHEAD`."""
    settings = _normalised(settings)
    inner = settings
    if settings.budget is not None:
        inner = dataclasses.replace(settings, budget=max(0, settings.budget - FIXED_OVERHEAD))
    p = _plan(program, x, inner, key)
    return dataclasses.replace(p, planned_bytes=p.planned_bytes + FIXED_OVERHEAD)


def _normalised(settings: TileSettings) -> TileSettings:
    """``exact-lean`` is exact mode without a spill store."""
    if settings.mode != "exact-lean":
        return settings
    return dataclasses.replace(settings, mode="exact", spill=None)


def _plan(program: Program, x: torch.Tensor, settings: TileSettings, key: object = None) -> TilePlan:
    base = _base_hw(program, x)
    batch, dtype = x.shape[0], x.dtype
    mode = settings.mode
    if mode == "plain":
        return _plan_plain(program, base, settings, batch, dtype)
    factor = (
        calibration_factor(key, "fast" if mode == "fast" else "exact", dtype) if key is not None else None
    )
    if mode == "fast":
        return _plan_fast(program, base, settings, batch, dtype, factor)
    exact = _plan_exact(program, base, settings, batch, dtype, factor)
    if mode == "auto" and settings.budget is not None and exact.planned_bytes > settings.budget:
        try:
            fast = _plan_fast(program, base, settings, batch, dtype, factor)
        except TilingUnsupportedError:
            return exact
        if fast.planned_bytes < exact.planned_bytes:
            return fast
    return exact


def minimum_budget(
    program: Program,
    x: torch.Tensor,
    mode: TileMode = "exact",
    *,
    max_tile: int | None = None,
    spill: SpillStore | None = None,
) -> int:
    """The smallest planned peak (bytes) of any tiled run of ``mode`` on ``x`` (tiles up to
    ``max_tile``, values spilled to ``spill`` where that helps): the least budget the planner can
    keep."""
    settings = TileSettings(mode=mode, leanest=True, budget=0, max_tile=max_tile, spill=spill)
    return plan(program, x, settings).planned_bytes


def run_tiled(
    program: Program, x: torch.Tensor, settings: TileSettings, *, key: object = None
) -> torch.Tensor:
    """Run ``program`` on ``x`` in tiles. On CUDA the first run per (module, mode, dtype) also
    calibrates the memory model from the measured peak."""
    p = plan(program, x, settings, key)
    spill = _normalised(settings).spill
    settings.used_tile = max(MIN_TILE, min(p.tile, max(_base_hw(program, x))))
    settings.used_mode = p.mode
    settings.planned_bytes = p.planned_bytes
    settings.spilled_bytes = p.spilled_bytes
    family = "plain" if p.mode == "plain" else "fast" if p.mode == "fast" else "exact"
    settings.least_bytes = (
        p.planned_bytes
        if settings.leanest
        else minimum_budget(program, x, family, max_tile=settings.max_tile, spill=spill)  # type: ignore[arg-type]
    )
    # CPU: freed memory stays for the next tile while the resident set keeps within the plan
    heap = (
        HeapGuard.starting_now(p.planned_bytes, step_transient(program, _base_hw(program, x), p.tile,
                                                               batch=x.shape[0], dtype=x.dtype))
        if x.device.type == "cpu" and p.mode != "plain"
        else None
    )  # fmt: skip

    def execute() -> torch.Tensor:
        if p.mode == "plain":
            return run_plain(program, x, tile=p.tile, progress=settings.progress, cancel=settings.cancel)
        if p.mode == "fast":
            return run_fast(program, x, tile=p.tile, segment=p.segment, progress=settings.progress,
                            cancel=settings.cancel, prefix=p.prefix, suffix=p.suffix, spill=spill,
                            lean=p.lean, resident=p.resident, heap=heap)  # fmt: skip
        assert p.schedule is not None
        return run_lean(program, x, p.schedule, progress=settings.progress, cancel=settings.cancel,
                        spill=spill, heap=heap)  # fmt: skip

    cal_mode = "fast" if p.mode == "fast" else "exact"
    if (
        key is not None
        and p.mode in ("exact", "fast")
        and x.device.type == "cuda"
        and calibration_factor(key, cal_mode, x.dtype) is None
    ):
        result: list[torch.Tensor] = []
        calibrate(key, program, x, _base_hw(program, x), p.tile, cal_mode, p.segment,  # type: ignore[arg-type]
                  lambda: result.append(execute()))  # fmt: skip
        return result[0]
    return execute()
