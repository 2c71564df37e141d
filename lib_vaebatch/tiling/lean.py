"""Exact tiled execution whose memory is bounded by the tile: whole values only where they fit.

The program is split at its clean cuts (values after which nothing reads an earlier value) into
segments, and each segment runs one of two ways:

* **whole**: step by step over the image in tiles, every value between the steps kept whole
  (``exact.run_steps``): each step runs once; memory is the whole values alive;
* **spill**: like whole, but the values the segment creates live in a spill store
  (:mod:`lib_vaebatch.tiling.spill`: host memory for a CUDA run, a temporary file for a CPU run)
  and each tile reads its crops from there: each step still runs once; memory is the segment's
  input and one tile's working set; the price is moving every value through the store once;
* **recompute**: only the segment's input and output are kept whole. Each GroupNorm inside the
  segment needs the statistics of a value the segment does not keep, so one pass per such value
  runs every tile from the segment's input up to it (halo included, with the statistics found by
  the passes before) and gathers its statistics from the tile cores; a last pass computes the
  output. Memory is the input, the output and one tile's chain; the price is the recomputed steps.

:func:`schedule` picks the cheapest mix whose planned peak fits a budget (every segment whole when
it fits: the fastest exact run), or the leanest. The output is exact either way: every value is
computed by the same layers over crops that include the halo each conv reads.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

import torch

from lib_vaebatch.heap import HeapGuard
from lib_vaebatch.tiling.exact import Run, TileCancel, TileProgress, count_units, run_steps, start_run
from lib_vaebatch.tiling.ops import Region, Slab, compute, grid, input_regions, tile_edges
from lib_vaebatch.tiling.program import Program
from lib_vaebatch.tiling.spill import SpillStore
from lib_vaebatch.tiling.stats import ChannelStats, norm_affine

SegmentKind = Literal["whole", "spill", "recompute"]

#: Allowance for a tile's temporaries beyond the tensors counted (conv workspaces).
WORKSPACE_FACTOR = 1.25
#: Allowance on whole values for allocator slack (freed blocks not reused exactly).
LIVE_SLACK = 1.1
#: Planned cost of one call of a layer on one tile, in multiply-adds (Python and dispatch overhead,
#: about a millisecond on a 2-core CPU):
#: it makes the planner prefer fewer, larger tiles where they fit.
CALL_OVERHEAD_MACS = 2e7
#: Planned cost of moving one byte through the spill store (read or written), in multiply-adds:
#: a CPU reads and writes a page-cached file at a few GB/s while it runs some 50-100 GMAC/s of
#: convolutions (bench/bench_lean.py), so about 40.
SPILL_MACS_PER_BYTE = 40.0


def clean_cuts(program: Program) -> list[int]:
    """Value indices where the program can be cut: no step after the cut reads a value before it."""
    n = len(program.steps)
    return [
        cut
        for cut in range(n + 1)
        if all(s.src >= cut and (s.skip is None or s.skip >= cut) for s in program.steps[cut:])
    ]


def _hw(program: Program, base: tuple[int, int], value: int) -> tuple[int, int]:
    f = program.factor(value)
    return base[0] * f, base[1] * f


def chain_regions(
    program: Program, base: tuple[int, int], first: int, last: int, core: Region
) -> dict[int, Region]:
    """What a tile whose core (at the lowest resolution) is ``core`` needs of every value from
    ``first`` to ``last`` to compute value ``last`` over its core."""
    req: dict[int, Region] = {last: core.scaled(program.factor(last))}
    for i in range(last - 1, first - 1, -1):
        step = program.steps[i]
        if i + 1 not in req:
            continue  # not on the path to ``last``
        src, skip = input_regions(step, req[i + 1], _hw(program, base, step.src))
        req[step.src] = src.union(req.get(step.src))
        if step.skip is not None and skip is not None:
            req[step.skip] = skip.union(req.get(step.skip))
    return req


class Tile:
    """One tile's chain of slabs from a whole value ``first`` to ``last``."""

    def __init__(self, run: Run, first: int, last: int, core: Region) -> None:
        self.core = core  # at the lowest resolution
        self.first, self.last = first, last
        self.req = chain_regions(run.program, run.base_hw, first, last, core)
        self.slabs: dict[int, Slab] = {}
        # within this chain, the last step that reads each value
        self.last_read: dict[int, int] = {}
        for i in range(first, last):
            step = run.program.steps[i]
            for v in (step.src, step.skip):
                if v is not None:
                    self.last_read[v] = i

    def core_of(self, run: Run, value: int) -> Region:
        return self.core.scaled(run.factor(value))

    def start(self, run: Run) -> None:
        need = self.req[self.first]
        data = run.values[self.first][:, :, need.y0 : need.y1, need.x0 : need.x1]
        self.slabs[self.first] = Slab(data.to(run.device), need)

    def step(self, run: Run, i: int, affine: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        step = run.program.steps[i]
        skip = self.slabs.get(step.skip) if step.skip is not None else None
        y = compute(step, self.slabs[step.src], self.req[i + 1], run.hw(step.src), affine=affine, skip=skip)
        self.slabs[i + 1] = Slab(y, self.req[i + 1])
        for value in (step.src, step.skip):
            if value is not None and self.last_read.get(value) == i:
                self.slabs.pop(value, None)
        return y

    def run_to_end(self, run: Run, affines: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        self.start(run)
        for i in range(self.first, self.last):
            self.step(run, i, affines.get(i))
            run.tick()
        return self.slabs[self.last].crop(self.core_of(run, self.last))


def stats_targets(program: Program, first: int, last: int) -> list[int]:
    """The values a recompute segment ``[first, last)`` makes passes for: those inside it that a
    norm reads, then its output."""
    need = program.needs_stats()
    return [v for v in range(first + 1, last) if need[v]] + [last]


def run_recompute(run: Run, first: int, last: int) -> None:
    """Steps ``first .. last-1`` keeping only values ``first`` (whole in ``run.values``, with its
    statistics if a norm reads it) and ``last`` (written whole) between tiles."""
    program = run.program
    need = program.needs_stats()
    cores = grid(run.base_hw[0], run.base_hw[1], run.tile)
    b = run.values[first].shape[0]
    out: torch.Tensor | None = None
    for target in stats_targets(program, first, last):
        final = target == last
        stats = ChannelStats(b, program.channels[target], run.device) if need[target] else None
        affines = {
            i: norm_affine(run.stats[program.steps[i].src], program.steps[i].norm)  # type: ignore[arg-type]
            for i in range(first, target)
            if program.steps[i].norm is not None
        }
        if final:
            h, w = run.hw(last)
            out = torch.empty(
                (b, program.channels[last], h, w), dtype=run.values[first].dtype, device=run.store
            )
        for core in cores:
            y = Tile(run, first, target, core).run_to_end(run, affines)
            if stats is not None:
                stats.add(y)
            if final:
                region = core.scaled(run.factor(last))
                assert out is not None
                out[:, :, region.y0 : region.y1, region.x0 : region.x1] = y.to(run.store)
            del y
            # a tile's chain is freed here; border tiles' crops differ in size, and freed blocks
            # the next chain does not fit would otherwise stay resident above the plan
            run.release()
        if stats is not None:
            run.stats[target] = stats
    assert out is not None
    for value in [v for v in run.values if v < last]:
        run.drop(value)
    for value in [v for v in run.stats if first < v < last or v == first]:
        run.stats.pop(value)
    run.values[last] = out


def recompute_units(run: Run, first: int, last: int) -> int:
    n_tiles = len(grid(run.base_hw[0], run.base_hw[1], run.tile))
    return sum(n_tiles * (t - first) for t in stats_targets(run.program, first, last))


# -- schedules -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    first: int
    last: int
    kind: SegmentKind


@dataclass(frozen=True)
class Schedule:
    """How to run a program in tiles: its segments, planned peak bytes and multiply-adds.
    ``passes`` is, per segment, how many times its tiles run (1 for whole and spill segments);
    ``spilled`` the planned peak bytes in the spill store."""

    tile: int
    segments: tuple[Segment, ...]
    peak: int
    cost: float
    passes: tuple[int, ...] = ()
    spilled: int = 0

    @property
    def recomputed(self) -> int:
        """Segments whose tiles run more than once (recomputation for their statistics)."""
        return sum(p > 1 for p in self.passes)

    @property
    def lean(self) -> bool:
        return self.recomputed > 0

    @property
    def spills(self) -> bool:
        return any(g.kind == "spill" for g in self.segments)

    @property
    def label(self) -> str:
        """ "exact-lean" (some steps recomputed), "exact-spill" (some values in the spill store),
        or "exact" (every value whole in memory)."""
        return "exact-lean" if self.lean else "exact-spill" if self.spills else "exact"


def run_schedule(run: Run, schedule: Schedule) -> None:
    for seg in schedule.segments:
        if seg.kind == "recompute":
            run_recompute(run, seg.first, seg.last)
        else:
            run_steps(run, seg.first, seg.last, spill=seg.kind == "spill")


def schedule_units(run: Run, schedule: Schedule) -> int:
    return sum(
        recompute_units(run, s.first, s.last) if s.kind == "recompute" else count_units(run, s.first, s.last)
        for s in schedule.segments
    )


def _macs(program: Program, i: int, area: int) -> float:
    """Multiply-adds of step ``i`` over an output region of ``area`` pixels (its resolution)."""
    step = program.steps[i]
    c_in, c_out = program.channels[step.src], program.channels[i + 1]
    if step.kind == "attn":
        return 4.0 * c_in * c_in * area + 2.0 * area * area * c_in
    assert step.conv is not None
    k = step.conv.kernel_size[0] * step.conv.kernel_size[1]
    macs = float(c_in * c_out * k * area)
    if step.shortcut is not None:
        ks = step.shortcut.kernel_size[0] * step.shortcut.kernel_size[1]
        macs += program.channels[step.skip] * c_out * ks * area  # type: ignore[index]
    return macs + 4.0 * c_in * area  # norm, activation, copies


def _step_temps(program: Program, i: int, out: Region, src_hw: tuple[int, int]) -> tuple[int, int]:
    """(elements, conv output area) of the temporaries of step ``i`` computing ``out``."""
    step = program.steps[i]
    c_in, c_out = program.channels[step.src], program.channels[i + 1]
    need, need_skip = input_regions(step, out, src_hw)
    area_in = need.height * need.width
    if step.kind == "up":
        conv_area = (out.height + 2 * step.padding) * (out.width + 2 * step.padding)
        elems = c_in * 4 * area_in + (c_in * area_in if step.norm is not None else 0)
    elif step.kind == "down":
        conv_area = out.height * out.width
        elems = c_in * area_in
    else:
        conv_area = area_in
        elems = c_in * area_in if step.norm is not None else 0
    elems += c_out * conv_area
    if step.skip is not None and need_skip is not None:
        elems += 2 * c_out * need_skip.height * need_skip.width  # shortcut output and the sum
    return elems, conv_area


def _interior_core(base: tuple[int, int], tile: int) -> tuple[Region, tuple[int, int]]:
    """The largest core of the grid, placed away from the border of a virtual image (so its halo
    is never clipped: the worst case for memory and work)."""
    ys, xs = tile_edges(base[0], tile), tile_edges(base[1], tile)
    ch = max(b - a for a, b in itertools.pairwise(ys))
    cw = max(b - a for a, b in itertools.pairwise(xs))
    if len(ys) == 2 and len(xs) == 2:
        return Region(0, base[0], 0, base[1]), base
    margin = 64
    return Region(margin, margin + ch, margin, margin + cw), (ch + 2 * margin, cw + 2 * margin)


def _cached(program: Program, key: tuple[object, ...], make):  # type: ignore[no-untyped-def]
    """Per-program memo (kept on the program, so it goes with it; programs are rebuilt when the
    module changes)."""
    cache: dict[tuple[object, ...], object] = program.__dict__.setdefault("_plan_cache", {})
    if key not in cache:
        if len(cache) > 4096:
            cache.clear()
        cache[key] = make()
    return cache[key]


def _chain_profile(
    program: Program, base: tuple[int, int], tile: int, first: int, last: int
) -> tuple[int, float]:
    """(peak elements, multiply-adds) of one tile's chain from ``first`` to ``last`` (batch 1)."""
    core, vbase = _interior_core(base, tile)
    return _cached(program, ("chain", core, vbase, first, last),
                   lambda: _chain_profile_uncached(program, core, vbase, first, last))  # fmt: skip


def _chain_profile_uncached(
    program: Program, core: Region, vbase: tuple[int, int], first: int, last: int
) -> tuple[int, float]:
    req = chain_regions(program, vbase, first, last, core)
    last_read: dict[int, int] = {}
    for i in range(first, last):
        step = program.steps[i]
        for v in (step.src, step.skip):
            if v is not None:
                last_read[v] = i
    alive = {first: program.channels[first] * req[first].height * req[first].width}
    peak, macs = 0, 0.0
    for i in range(first, last):
        step = program.steps[i]
        out = req[i + 1]
        temps, conv_area = _step_temps(program, i, out, _hw(program, vbase, step.src))
        out_elems = program.channels[i + 1] * out.height * out.width
        peak = max(peak, sum(alive.values()) + temps + out_elems)
        macs += _macs(program, i, conv_area) + CALL_OVERHEAD_MACS
        alive[i + 1] = out_elems
        for v in (step.src, step.skip):
            if v is not None and last_read.get(v) == i:
                alive.pop(v, None)
    return peak, macs


def _value_elems(program: Program, base: tuple[int, int], value: int) -> int:
    h, w = _hw(program, base, value)
    return program.channels[value] * h * w


def _whole_steps(
    program: Program, base: tuple[int, int], tile: int, batch: int, factor: float
) -> tuple[list[float], list[float]]:
    """Per step, run with whole values: (planned peak elements, multiply-adds)."""

    def make() -> tuple[list[float], list[float]]:
        from lib_vaebatch.tiling.plan import exact_live, tile_work

        n = len(program.steps)
        n_tiles = len(grid(base[0], base[1], tile))
        live = exact_live(program, base, batch, range(n))
        peaks = [LIVE_SLACK * live[i] + factor * tile_work(program, base, tile, i, batch) for i in range(n)]
        macs = []
        for i in range(n):
            if program.steps[i].kind == "attn":
                h, w = _hw(program, base, i + 1)
                macs.append(batch * _macs(program, i, h * w))
            else:
                macs.append(batch * n_tiles * _chain_profile(program, base, tile, i, i + 1)[1])
        return peaks, macs

    return _cached(program, ("whole", base, tile, batch, factor), make)


def _whole_segment(
    program: Program, base: tuple[int, int], tile: int, first: int, last: int, batch: int, factor: float
) -> tuple[float, float, float]:
    """(peak elements, multiply-adds, 0 spilled) of steps ``first .. last-1`` with whole values."""
    peaks, macs = _whole_steps(program, base, tile, batch, factor)
    return max(peaks[first:last]), sum(macs[first:last]), 0.0


def _spill_steps(
    program: Program, base: tuple[int, int], tile: int, batch: int
) -> tuple[list[float], list[float]]:
    """Per step, run with its values in the spill store: (one tile's working set in elements:
    its crops of the source and skip values, temporaries, output and the output's copy for
    writing; elements moved through the store by all tiles)."""

    def make() -> tuple[list[float], list[float]]:
        n_tiles = len(grid(base[0], base[1], tile))
        core, vbase = _interior_core(base, tile)
        work, moved = [], []
        for i, step in enumerate(program.steps):
            req = chain_regions(program, vbase, i, i + 1, core)
            out = req[i + 1]
            w = _chain_profile(program, base, tile, i, i + 1)[0]
            w += program.channels[i + 1] * out.height * out.width
            io = program.channels[step.src] * req[step.src].height * req[step.src].width
            io += program.channels[i + 1] * out.height * out.width
            if step.skip is not None and step.skip != step.src:
                _, skip = input_regions(step, out, _hw(program, vbase, step.src))
                assert skip is not None
                w += program.channels[step.skip] * skip.height * skip.width
                io += program.channels[step.skip] * skip.height * skip.width
            work.append(float(batch * w))
            moved.append(float(batch * n_tiles * io))
        return work, moved

    return _cached(program, ("spill", base, tile, batch), make)


def _spill_segment(
    program: Program, base: tuple[int, int], tile: int, first: int, last: int, batch: int, factor: float,
    io_macs: float,
) -> tuple[float, float, float] | None:  # fmt: skip
    """(peak elements, multiply-adds, peak elements in the store) of steps ``first .. last-1``
    with their values spilled; the segment's input stays where it is (counted as resident), the
    program's output is written to memory."""
    if any(program.steps[i].kind == "attn" for i in range(first, last)):
        return None  # attention reads every position at once
    from lib_vaebatch.tiling.plan import exact_live

    n = len(program.steps)
    work, moved = _spill_steps(program, base, tile, batch)
    _, macs = _whole_steps(program, base, tile, batch, factor)
    resident = batch * _value_elems(program, base, first)
    if last == n:
        resident += batch * _value_elems(program, base, n)
    peak = LIVE_SLACK * resident + factor * max(work[first:last])
    cost = sum(macs[first:last]) + io_macs * sum(moved[first:last])
    stored = max(exact_live(program, base, batch, range(first, last)))
    return peak, cost, float(stored)


def _recompute_segment(
    program: Program, base: tuple[int, int], tile: int, first: int, last: int, batch: int, factor: float
) -> tuple[float, float] | None:
    if any(program.steps[i].kind == "attn" for i in range(first, last)):
        return None  # attention reads every position: its input must be whole
    n_tiles = len(grid(base[0], base[1], tile))
    whole = _value_elems(program, base, first) + _value_elems(program, base, last)
    work, macs = 0, 0.0
    for target in stats_targets(program, first, last):
        w, m = _chain_profile(program, base, tile, first, target)
        work = max(work, w)
        macs += n_tiles * m
    return LIVE_SLACK * batch * whole + factor * batch * work, batch * macs, 0.0


SegmentCosts = dict[tuple[int, int, SegmentKind], tuple[float, float, float]]


def _segments(
    program: Program, base: tuple[int, int], tile: int, batch: int, factor: float, io_macs: float
) -> SegmentCosts:
    return _cached(program, ("segments", base, tile, batch, factor, io_macs),
                   lambda: _segments_uncached(program, base, tile, batch, factor, io_macs))  # fmt: skip


def _segments_uncached(
    program: Program, base: tuple[int, int], tile: int, batch: int, factor: float, io_macs: float
) -> SegmentCosts:
    cuts = clean_cuts(program)
    out: SegmentCosts = {}
    for ai, a in enumerate(cuts):
        for b in cuts[ai + 1 :]:
            out[(a, b, "whole")] = _whole_segment(program, base, tile, a, b, batch, factor)
            spill = _spill_segment(program, base, tile, a, b, batch, factor, io_macs)
            if spill is not None:
                out[(a, b, "spill")] = spill
            rec = _recompute_segment(program, base, tile, a, b, batch, factor)
            if rec is not None:
                out[(a, b, "recompute")] = rec
    return out


def _best(
    program: Program,
    segs: SegmentCosts,
    limit: float | None,
    start: int,
    end: int,
) -> tuple[float, float, tuple[Segment, ...]] | None:
    """Cheapest chain of segments from value ``start`` to value ``end`` whose peak stays within
    ``limit`` elements (None: the one with the lowest peak, then the cheapest)."""
    cuts = [c for c in clean_cuts(program) if start <= c <= end]
    if not cuts or cuts[0] != start or cuts[-1] != end:
        return None
    best: dict[int, tuple[tuple[float, float], float, float, tuple[Segment, ...]]] = {
        start: ((0.0, 0.0), 0.0, 0.0, ())
    }
    for b in cuts[1:]:
        cands = []
        for (a, bb, kind), (peak, cost, _) in segs.items():
            if bb != b or a not in best or (limit is not None and peak > limit):
                continue
            _, p0, c0, path = best[a]
            p, c = max(p0, peak), c0 + cost
            key = (c, p) if limit is not None else (p, c)
            cands.append((key, p, c, (*path, Segment(a, b, kind))))
        if cands:
            best[b] = min(cands, key=lambda t: t[0])
    if end not in best:
        return None
    _, peak, cost, path = best[end]
    return peak, cost, path


def schedule(
    program: Program,
    base: tuple[int, int],
    tile: int,
    *,
    budget: int | None = None,
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
    leanest: bool = False,
    start: int = 0,
    end: int | None = None,
    factor: float = WORKSPACE_FACTOR,
    spill: int | None = None,
    io_macs: float = SPILL_MACS_PER_BYTE,
) -> Schedule:
    """The cheapest schedule of values ``start`` to ``end`` (clean cuts; default: the whole
    program) whose planned peak fits ``budget`` bytes; with ``leanest``, or when nothing fits, the
    one with the lowest planned peak. ``budget=None``: every segment whole (the fastest).
    ``spill``: bytes the spill store may hold (None: no spill segments); ``io_macs``: the planned
    cost of moving a byte through it."""
    end = len(program.steps) if end is None else end
    if start == end:
        return Schedule(tile, (), 0, 0.0)
    size = torch.empty((), dtype=dtype).element_size()
    segs = _segments(program, base, tile, batch, factor, io_macs * size)
    segs = {k: v for k, v in segs.items() if k[2] != "spill" or (spill is not None and v[2] * size <= spill)}
    if budget is None and not leanest:
        segs = {k: v for k, v in segs.items() if k[2] == "whole"}
        found = _best(program, segs, float("inf"), start, end)
    else:
        found = None if leanest else _best(program, segs, budget / size, start, end)  # type: ignore[operator]
        if found is None:
            found = _best(program, segs, None, start, end)
    if found is None:
        raise ValueError(f"values {start} and {end} are not clean cuts of the program")
    peak, cost, path = found
    passes = tuple(len(stats_targets(program, g.first, g.last)) if g.kind == "recompute" else 1 for g in path)
    spilled = max((segs[(g.first, g.last, g.kind)][2] for g in path), default=0.0)
    return Schedule(tile, path, int(peak * size), cost, passes, int(spilled * size))


def run_lean(
    program: Program,
    x: torch.Tensor,
    plan: Schedule,
    *,
    store: torch.device | None = None,
    progress: TileProgress | None = None,
    cancel: TileCancel | None = None,
    spill: SpillStore | None = None,
    heap: HeapGuard | None = None,
) -> torch.Tensor:
    """Run ``program`` on ``x`` by the schedule ``plan`` (see :func:`schedule`); exact. ``spill``
    is where its spill segments keep their values (required if it has any); ``heap`` as for
    :func:`~lib_vaebatch.tiling.exact.start_run`."""
    if plan.spills and spill is None:
        raise ValueError("this schedule spills values but no spill store was given")
    run = start_run(program, x, plan.tile, store, progress, cancel, spill, heap)
    run.total = schedule_units(run, plan)
    run_schedule(run, plan)
    return run.result()
