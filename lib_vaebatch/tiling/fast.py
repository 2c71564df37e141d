"""Fast tiled execution: the high-resolution stage runs as independent tiles with estimated
GroupNorm statistics, so its full-resolution activations are never held whole or synchronised.

The program is cut at a clean point (no skip connection crosses it, no attention inside). The
low-resolution part runs exactly (by a schedule of :mod:`lib_vaebatch.tiling.lean`: whole values
where they fit, recomputation where they do not). In the independent segment every tile
computes, step by step, only the region later steps need (its core plus a halo that shrinks to
zero).

Statistics for the segment's norms are a ratio estimate:

1. a *proxy* pass runs the segment exactly on its input subsampled by 2 (a quarter of the work):
   it sees the whole image, but at half resolution its statistics are biased;
2. a stratified sample of tiles (a checkerboard, or every other row and column on large grids)
   runs in lockstep at full resolution: unbiased, but only part of the image;
3. per channel, ``mean = proxy_mean + (sample_mean - proxy_mean_over_the_samples)`` and
   ``var = proxy_var * sample_var / proxy_var_over_the_samples``: the sample tiles measure the
   proxy's bias where both exist, and the proxy supplies the coverage.

The sample tiles' outputs are final, so no tile is computed twice. With few tiles, every tile is a
sample and the statistics are exact.

*Lean* (with a spill store, when the above does not fit the budget): the segment's input goes to
the store, the proxy runs in tiles with its values spilled, and the sample tiles park their slabs
in the store between lockstep steps, so memory is one tile's chain plus the segment's output. The
planner keeps as many sample tiles in memory (unparked) as the budget holds beyond that: each
one kept saves its slabs' trip through the store. The statistics and the output are the same as
without it.
"""

from __future__ import annotations

import torch

from lib_vaebatch.heap import HeapGuard
from lib_vaebatch.tiling.exact import Run, TileCancel, TileProgress, count_units, run_steps, start_run
from lib_vaebatch.tiling.lean import Schedule, Tile, clean_cuts, run_schedule, schedule_units
from lib_vaebatch.tiling.ops import Region, Slab, grid, sample_tiles
from lib_vaebatch.tiling.program import Program, TilingUnsupportedError
from lib_vaebatch.tiling.spill import BAND_BYTES, DiskValue, SpillStore
from lib_vaebatch.tiling.stats import ChannelStats, Moments, norm_affine


def default_segment(program: Program) -> tuple[int, int]:
    """The independent segment ``[first, last)`` of steps: a decoder's last resolution stage (from
    its last upsampler on), an encoder's first (up to and including its first downsampler)."""
    cuts = clean_cuts(program)
    kinds = [s.kind for s in program.steps]
    if program.kind == "decoder":
        start = max((i for i, k in enumerate(kinds) if k == "up"), default=None)
        if start is None or start not in cuts:
            raise TilingUnsupportedError("no clean cut before the decoder's last resolution stage")
        return start, len(kinds)
    end = min((i for i, k in enumerate(kinds) if k == "down"), default=None)
    if end is None or end + 1 not in cuts:
        raise TilingUnsupportedError("no clean cut after the encoder's first resolution stage")
    return 0, end + 1


def _subsample_into_store(run: Run, proxy: Run, first: int, hw: tuple[int, int]) -> None:
    """The proxy's input (value ``first`` subsampled by 2) written to the spill store band by band,
    its statistics gathered on the way."""
    src = run.values[first]
    b, c = src.shape[0], src.shape[1]
    assert run.spill is not None
    value = run.spill.new((b, c, *hw), src.dtype)
    stats = ChannelStats(b, c, run.device) if first in run.stats else None
    rows = max(1, BAND_BYTES // max(1, b * c * hw[1] * 4))
    for y in range(0, hw[0], rows):
        y1 = min(hw[0], y + rows)
        part = src[:, :, 2 * y : 2 * y1 : 2, : 2 * hw[1] : 2]
        value[:, :, y:y1, :] = part
        if stats is not None:
            stats.add(part.to(run.device))
    proxy.values[first] = value
    if stats is not None:
        proxy.stats[first] = stats


def _proxy_moments(
    run: Run, first: int, last: int, samples: list[Region], lean: bool = False
) -> tuple[dict[int, Moments], dict[int, Moments]]:
    """Run the segment exactly on its input subsampled by 2; per value inside the segment that a
    norm reads: the moments over the whole proxy, and over the proxy's view of the sample tiles.
    ``lean``: in tiles, with the proxy's values in the spill store."""
    program = run.program
    bh, bw = run.base_hw[0] // 2, run.base_hw[1] // 2
    f = run.factor(first)
    spill = run.spill if lean else None
    # in the run's own tiles: one tile over the whole proxy would hold temporaries of a quarter of
    # the full-resolution image (the planner counts one tile's)
    proxy = Run(program, run.tile, (bh, bw), run.device, run.store, None, run.cancel, spill=spill,
                heap=run.heap)  # fmt: skip
    if lean:
        _subsample_into_store(run, proxy, first, (bh * f, bw * f))
    else:
        x = run.values[first][:, :, : 2 * bh * f : 2, : 2 * bw * f : 2]
        proxy.values[first] = x.to(run.store)
        if first in run.stats:
            proxy.stats[first] = ChannelStats(x.shape[0], x.shape[1], run.device)
            proxy.stats[first].add(x.to(run.device))
    needed = program.needs_stats()
    whole: dict[int, Moments] = {}
    local: dict[int, Moments] = {}

    def seen(value: int, tensor: torch.Tensor | DiskValue) -> None:
        if not needed[value] or value >= last:
            return
        whole[value] = proxy.stats[value].moments()
        fv = proxy.factor(value)
        acc = ChannelStats(tensor.shape[0], tensor.shape[1], run.device)
        for core in samples:
            r = Region(
                core.y0 // 2, min(bh, -(-core.y1 // 2)), core.x0 // 2, min(bw, -(-core.x1 // 2))
            ).scaled(fv)
            if r.height > 0 and r.width > 0:
                acc.add(tensor[:, :, r.y0 : r.y1, r.x0 : r.x1].to(run.device))
        local[value] = acc.moments()

    run_steps(proxy, first, last, on_value=seen, spill=lean)
    for v in list(proxy.values):
        proxy.drop(v)
    return whole, local


def _ratio(proxy: Moments, proxy_at_samples: Moments, samples: Moments) -> Moments:
    tiny = torch.finfo(torch.float32).tiny
    ratio = torch.where(proxy_at_samples.var > tiny, samples.var / proxy_at_samples.var.clamp_min(tiny), 1.0)
    var = torch.where(proxy_at_samples.var > tiny, proxy.var * ratio, samples.var)
    return Moments(proxy.mean + (samples.mean - proxy_at_samples.mean), var)


def _park(run: Run, tile: Tile, value: int) -> None:
    """Move a sample tile's slab of ``value`` to the spill store until a later step reads it."""
    slab = tile.slabs[value]
    assert run.spill is not None and isinstance(slab.data, torch.Tensor)
    tile.slabs[value] = Slab(run.spill.put(slab.data), slab.region)  # type: ignore[arg-type]


def run_segment(
    run: Run, first: int, last: int, out: torch.Tensor | DiskValue, lean: bool = False, resident: int = 0
) -> ChannelStats | None:
    """Steps ``first .. last-1`` as independent tiles; value ``first`` is whole in ``run.values``
    (with its statistics in ``run.stats`` if the segment normalises it). Writes value ``last`` into
    ``out`` and returns its statistics (over every tile) if a later step needs them. ``lean``: with
    the input, the proxy and the sample tiles' slabs in the spill store (see the module doc), but
    for the first ``resident`` sample tiles, whose slabs stay in memory (as much as the budget
    holds: each one kept saves its slabs' trip through the store)."""
    program = run.program
    if lean:
        if run.spill is None:
            raise ValueError("lean fast tiles need a spill store")
        src = run.values[first]
        if isinstance(src, torch.Tensor):
            run.values[first] = run.spill.put(src)
        del src
    need_stats = program.needs_stats()
    cores = grid(run.base_hw[0], run.base_hw[1], run.tile)
    rows = len({c.y0 for c in cores})
    cols = len(cores) // rows
    sampled = sample_tiles(rows, cols)
    exact = len(sampled) == len(cores)
    out_stats = ChannelStats(out.shape[0], out.shape[1], run.device) if need_stats[last] else None
    proxy: dict[int, Moments] = {}
    proxy_local: dict[int, Moments] = {}
    if not exact and min(run.base_hw) >= 2:
        proxy, proxy_local = _proxy_moments(run, first, last, [cores[k] for k in sampled], lean)

    def finish(tile: Tile) -> None:
        region = tile.core_of(run, last)
        y = tile.slabs[last].crop(region)
        if out_stats is not None:
            out_stats.add(y)
        out[:, :, region.y0 : region.y1, region.x0 : region.x1] = y.to(out.device)
        tile.slabs.clear()

    # The sample tiles, in lockstep: full-resolution statistics of part of the image.
    estimates: dict[int, Moments] = {first: run.stats[first].moments()} if first in run.stats else {}
    tiles = [Tile(run, first, last, cores[k]) for k in sampled]
    parked = [lean and k >= resident for k in range(len(tiles))]
    for tile, park in zip(tiles, parked, strict=True):
        tile.start(run)
        if park:
            _park(run, tile, first)
    for i in range(first, last):
        step = program.steps[i]
        affine = norm_affine(estimates[step.src], step.norm) if step.norm is not None else None
        value = i + 1
        acc = ChannelStats(out.shape[0], program.channels[value], run.device) if need_stats[value] else None
        for tile, park in zip(tiles, parked, strict=True):
            tile.step(run, i, affine)
            if park:
                _park(run, tile, value)
            if acc is not None and value < last:
                acc.add(tile.slabs[value].crop(tile.core_of(run, value)))
            run.tick()
        run.release()
        if acc is not None and value < last:
            measured = acc.moments()
            ratio = not exact and value in proxy
            estimates[value] = _ratio(proxy[value], proxy_local[value], measured) if ratio else measured
    for tile in tiles:
        finish(tile)

    # Every other tile on its own, with the statistics frozen.
    affines = {
        i: norm_affine(estimates[program.steps[i].src], program.steps[i].norm)  # type: ignore[arg-type]
        for i in range(first, last)
        if program.steps[i].norm is not None
    }
    for k, core in enumerate(cores):
        if k in sampled:
            continue
        tile = Tile(run, first, last, core)
        tile.start(run)
        for i in range(first, last):
            tile.step(run, i, affines.get(i))
            run.tick()
        finish(tile)
        run.release()
    return out_stats


def lean_segment_plan(
    program: Program, base: tuple[int, int], tile: int, batch: int, first: int, last: int, factor: float
) -> tuple[float, float]:
    """(planned peak elements, elements moved through the store) of the lean independent segment:
    one tile's whole chain (an unsampled tile keeps its slabs) or a proxy tile's step, and the
    segment's output where it is the program's (else it goes to the store)."""
    from lib_vaebatch.tiling.lean import LIVE_SLACK, _chain_profile, _spill_steps, _value_elems

    n = len(program.steps)
    chain = _chain_profile(program, base, tile, first, last)[0]
    proxy_base = (max(1, base[0] // 2), max(1, base[1] // 2))
    proxy_work, proxy_moved = _spill_steps(program, proxy_base, tile, batch)
    out = batch * _value_elems(program, base, last) if last == n else 0
    peak = LIVE_SLACK * out + factor * max(batch * chain, max(proxy_work[first:last]))
    # the input once, the proxy's values, a quarter of the full-resolution values (the sample
    # tiles' parked slabs) out and back
    full = sum(batch * _value_elems(program, base, v) for v in range(first, last + 1))
    moved = batch * _value_elems(program, base, first) + sum(proxy_moved[first:last]) + full / 2
    return peak, moved


def run_fast(
    program: Program,
    x: torch.Tensor,
    *,
    tile: int,
    segment: tuple[int, int] | None = None,
    store: torch.device | None = None,
    progress: TileProgress | None = None,
    cancel: TileCancel | None = None,
    prefix: Schedule | None = None,
    suffix: Schedule | None = None,
    spill: SpillStore | None = None,
    lean: bool = False,
    resident: int = 0,
    heap: HeapGuard | None = None,
) -> torch.Tensor:
    """Run ``program`` with its high-resolution stage in independent tiles (see the module doc).
    The steps before and after that stage run exactly, by the ``prefix`` and ``suffix`` schedules
    (default: whole values, see :mod:`lib_vaebatch.tiling.lean`); ``lean`` runs the stage itself
    with its values in ``spill`` (see the module doc), but for the slabs of the first ``resident``
    sample tiles; ``heap`` as for :func:`~lib_vaebatch.tiling.exact.start_run`."""
    first, last = segment or default_segment(program)
    n = len(program.steps)
    if any(program.steps[i].kind == "attn" for i in range(first, last)):
        raise TilingUnsupportedError("attention cannot run in independent tiles")
    run = start_run(program, x, tile, store, progress, cancel, spill, heap)
    n_tiles = len(grid(run.base_hw[0], run.base_hw[1], tile))
    before = prefix.segments if prefix is not None else ()
    after = suffix.segments if suffix is not None else ()
    total_before = schedule_units(run, prefix) if prefix is not None else count_units(run, 0, first)
    total_after = schedule_units(run, suffix) if suffix is not None else count_units(run, last, n)
    run.total = total_before + n_tiles * (last - first) + total_after
    if before:
        run_schedule(run, prefix)  # type: ignore[arg-type]
    else:
        run_steps(run, 0, first)
    h, w = run.hw(last)
    shape = (x.shape[0], program.channels[last], h, w)
    dtype = run.values[first].dtype
    out: torch.Tensor | DiskValue
    if lean and last < n and spill is not None:
        out = spill.new(shape, dtype)
    else:
        out = torch.empty(shape, dtype=dtype, device=run.store)
    stats = run_segment(run, first, last, out, lean, resident)
    for value in [v for v in run.values if v < last]:
        run.drop(value)
    run.values[last] = out
    if stats is not None:
        run.stats[last] = stats
    if after:
        run_schedule(run, suffix)  # type: ignore[arg-type]
    else:
        run_steps(run, last, n)
    return run.result()
