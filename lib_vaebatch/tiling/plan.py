"""Memory of a tiled run, simulated from the program's shapes, and the tile size that fits a budget.

Whole values alive at each step (exact mode) or the sample tiles' slabs (fast mode) are known
exactly from the program; one tile's temporaries are estimated and multiplied by a calibration
factor (:data:`DEFAULT_WORKSPACE_FACTOR`, or measured on CUDA by :func:`calibrate`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from lib_vaebatch.tiling.ops import Region, grid, sample_tiles
from lib_vaebatch.tiling.program import Program

Mode = Literal["exact", "fast"]

#: Allowance for a tile's temporaries beyond the tensors counted (conv workspaces).
DEFAULT_WORKSPACE_FACTOR = 1.25
#: Allowance on whole values for allocator slack (freed blocks not reused exactly); from peak RSS
#: measured on CPU at 1024² (bench/bench_tiling.py).
LIVE_SLACK = 1.1
#: Planned tiles are at most this many latent pixels a side: larger tiles barely run faster, while a
#: tile's temporaries grow with its area (at 1024², tile 64 peaked at 74% of the untiled decode's
#: memory, tile 32 at 52%).
MAX_PLANNED_TILE = 32
MIN_TILE = 8

_calibration: dict[tuple[int, str, torch.dtype], float] = {}


def _hw(program: Program, base: tuple[int, int], value: int) -> tuple[int, int]:
    f = program.factor(value)
    return base[0] * f, base[1] * f


def tile_work(program: Program, base: tuple[int, int], tile: int, i: int, batch: int) -> int:
    """Elements of one tile's temporaries while step ``i`` runs (its largest tile)."""
    step = program.steps[i]
    out = i + 1
    f = program.factor(out)
    core = min(tile, max(base)) * f
    c_in, c_out = program.channels[step.src], program.channels[out]
    if step.kind == "attn":
        return 4 * batch * c_in * core * core
    pad = step.padding
    if step.kind == "up":
        conv_in = (core + 2 * pad) ** 2
        work = c_in * conv_in  # the upsampled crop (the low-resolution crop is a view)
    elif step.kind == "down":
        conv_in = (2 * core + 1) ** 2
        work = c_in * conv_in if step.norm is not None else 0
    else:
        conv_in = (core + 2 * pad) ** 2
        work = c_in * conv_in if step.norm is not None else 0  # the normalised copy (SiLU is in place)
    # the conv's output over the crop; the shortcut's output, the skip sum and the centred copy for
    # the statistics, each core-sized
    work += c_out * (conv_in + 3 * core * core)
    return batch * work


def step_transient(
    program: Program,
    base: tuple[int, int],
    tile: int,
    *,
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
    factor: float = DEFAULT_WORKSPACE_FACTOR,
) -> int:
    """Planned bytes of the largest temporaries one tile's step allocates and frees again (the
    rise of memory within a step that the values alive between steps do not show)."""
    size = torch.empty((), dtype=dtype).element_size()
    work = max((tile_work(program, base, tile, i, batch) for i in range(len(program.steps))), default=0)
    return int(factor * work * size)


def exact_live(program: Program, base: tuple[int, int], batch: int, steps: range) -> list[int]:
    """Elements of whole values alive while each step in ``steps`` runs."""
    last_use = program.last_use()
    sizes = [batch * program.channels[v] * _hw(program, base, v)[0] * _hw(program, base, v)[1]
             for v in range(len(program.steps) + 1)]  # fmt: skip
    live = []
    for i in steps:
        alive = sum(sizes[v] for v in range(i + 1) if last_use[v] >= i)
        step = program.steps[i]
        aliased = (
            step.skip is not None and last_use[step.skip] == i and step.skip != step.src
            and (step.shortcut is None or step.shortcut.kernel_size == (1, 1))
            and sizes[step.skip] == sizes[i + 1]
        )  # fmt: skip
        live.append(alive + (0 if aliased else sizes[i + 1]))
    return live


def estimate_peak(
    program: Program,
    base: tuple[int, int],
    tile: int,
    *,
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
    mode: Mode = "exact",
    segment: tuple[int, int] | None = None,
    factor: float = DEFAULT_WORKSPACE_FACTOR,
) -> int:
    """Planned peak bytes of a tiled run of ``program`` on a ``base`` (latent) grid."""
    size = torch.empty((), dtype=dtype).element_size()
    n = len(program.steps)
    first, last = segment if (mode == "fast" and segment is not None) else (n, n)
    live = exact_live(program, base, batch, range(n))
    peaks = [
        LIVE_SLACK * live[i] + factor * tile_work(program, base, tile, i, batch)
        for i in range(n)
        if not first <= i < last
    ]
    if first < last:
        peaks.append(fast_segment_peak(program, base, tile, batch, first, last, factor))
    return int(max(peaks, default=0) * size)


def fast_segment_peak(
    program: Program, base: tuple[int, int], tile: int, batch: int, first: int, last: int, factor: float
) -> float:
    """Planned peak elements of the independent segment of a fast run (its whole input and output,
    the sample tiles in lockstep or the proxy, one tile's temporaries)."""

    h0, w0 = _hw(program, base, first)
    hl, wl = _hw(program, base, last)
    whole = batch * (program.channels[first] * h0 * w0 + program.channels[last] * hl * wl)
    tiles = _sample_regions(program, base, tile, first, last)
    lockstep = max(sum(_slab_elements(program, regs, i, batch) for regs in tiles) for i in range(first, last))
    proxy_base = (max(1, base[0] // 2), max(1, base[1] // 2))
    proxy = max(exact_live(program, proxy_base, batch, range(first, last)), default=0)
    work = max(tile_work(program, base, tile, i, batch) for i in range(first, last))
    return LIVE_SLACK * (whole + max(lockstep, proxy)) + factor * work


def lockstep_tile_elements(
    program: Program, base: tuple[int, int], tile: int, batch: int, first: int, last: int
) -> tuple[int, int]:
    """(elements one sample tile holds between lockstep steps at most, number of sample tiles) of
    the independent segment: what a lean fast run keeps in memory per sample tile it does not park."""
    tiles = _sample_regions(program, base, tile, first, last)
    per = max(_slab_elements(program, regs, i, batch) for regs in tiles for i in range(first, last))
    return per, len(tiles)


def _sample_regions(
    program: Program, base: tuple[int, int], tile: int, first: int, last: int
) -> list[dict[int, Region]]:
    """The regions each sample tile of the independent segment computes, per value."""
    cores = grid(base[0], base[1], tile)
    rows = len({c.y0 for c in cores})
    return [_regions(program, base, first, last, cores[k]) for k in sample_tiles(rows, len(cores) // rows)]


def _regions(
    program: Program, base: tuple[int, int], first: int, last: int, core: Region
) -> dict[int, Region]:
    from lib_vaebatch.tiling.ops import input_regions

    f = program.factor(last)
    req = {last: core.scaled(f)}
    for i in range(last - 1, first - 1, -1):
        step = program.steps[i]
        src, skip = input_regions(step, req[i + 1], _hw(program, base, step.src))
        req[step.src] = src.union(req.get(step.src))
        if step.skip is not None and skip is not None:
            req[step.skip] = skip.union(req.get(step.skip))
    return req


def _slab_elements(program: Program, req: dict[int, Region], i: int, batch: int) -> int:
    last_use = program.last_use()
    total = 0
    for v, r in req.items():
        if v <= i + 1 and (last_use[v] >= i or v == i + 1):
            total += batch * program.channels[v] * r.height * r.width
    return total


def plan_tile(
    program: Program,
    base: tuple[int, int],
    budget: int,
    *,
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
    mode: Mode = "exact",
    segment: tuple[int, int] | None = None,
    factor: float | None = None,
) -> tuple[int, int]:
    """The largest tile (latent pixels, :data:`MIN_TILE` to :data:`MAX_PLANNED_TILE`) whose planned
    peak fits ``budget``, and that peak. If nothing fits, the smallest tile and its peak."""
    f = factor if factor is not None else DEFAULT_WORKSPACE_FACTOR
    lo, hi = MIN_TILE, max(MIN_TILE, min(MAX_PLANNED_TILE, max(base)))

    def peak(t: int) -> int:
        return estimate_peak(program, base, t, batch=batch, dtype=dtype, mode=mode, segment=segment, factor=f)

    if peak(hi) <= budget:
        return hi, peak(hi)
    if peak(lo) > budget:
        return lo, peak(lo)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if peak(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo, peak(lo)


def calibration_factor(key: object, mode: Mode, dtype: torch.dtype) -> float | None:
    """A factor measured by :func:`calibrate` for this module, mode and dtype, if any."""
    return _calibration.get((key, mode, dtype))  # type: ignore[arg-type]


def calibrate(
    key: object,
    program: Program,
    x: torch.Tensor,
    base: tuple[int, int],
    tile: int,
    mode: Mode,
    segment: tuple[int, int] | None,
    execute: Callable[[], object],
) -> float:
    """On CUDA: run ``execute()`` (a tiled run of ``program`` on ``x``) once, measure its peak
    allocated bytes, and keep the workspace factor that makes :func:`estimate_peak` match it."""
    if x.device.type != "cuda":
        return DEFAULT_WORKSPACE_FACTOR
    device = x.device
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    execute()
    torch.cuda.synchronize(device)
    measured = torch.cuda.max_memory_allocated(device) - before
    kw = {"batch": x.shape[0], "dtype": x.dtype, "mode": mode, "segment": segment}
    fixed = estimate_peak(program, base, tile, factor=0.0, **kw)  # type: ignore[arg-type]
    work = estimate_peak(program, base, tile, factor=1.0, **kw) - fixed  # type: ignore[arg-type]
    factor = max(1.0, (measured - fixed) / work) if work > 0 else DEFAULT_WORKSPACE_FACTOR
    _calibration[(key, mode, x.dtype)] = factor  # type: ignore[index]
    return factor
