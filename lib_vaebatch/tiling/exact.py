"""Exact tiled execution: one step at a time over the whole image, tile by tile.

Values between steps are kept whole (on ``store``, the compute device unless told otherwise), so a
conv only needs its padding as a halo and tile cores are exact. Statistics for the next GroupNorm
are gathered from each tile's output as it is written (no extra pass). A resnet's output is written
into its input's memory when nothing else reads that input, and attention runs over all positions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lib_vaebatch.heap import HeapGuard, release_freed
from lib_vaebatch.tiling.ops import Region, Slab, compute, grid, project
from lib_vaebatch.tiling.program import Program, Step
from lib_vaebatch.tiling.spill import DiskValue, SpillStore, resident
from lib_vaebatch.tiling.stats import ChannelStats, apply_affine, norm_affine

#: ``progress(done, total)`` in tile-steps; ``cancel()`` -> True stops between tiles.
TileProgress = Callable[[int, int], None]
TileCancel = Callable[[], bool]


class TilingCancelledError(RuntimeError):
    """Cancelled between two tiles; the sample being tiled is not finished."""


@dataclass
class Run:
    """State shared by the executors for one tiled call."""

    program: Program
    tile: int  # in pixels of the program's lowest-resolution value
    base_hw: tuple[int, int]  # size of that lowest-resolution value
    device: torch.device
    store: torch.device
    progress: TileProgress | None = None
    cancel: TileCancel | None = None
    done: int = 0
    total: int = 0
    values: dict[int, torch.Tensor | DiskValue] = field(default_factory=dict)
    stats: dict[int, ChannelStats] = field(default_factory=dict)
    #: where "spill" segments keep the values they create (None: nowhere, they cannot run)
    spill: SpillStore | None = None
    #: keeps the process's resident set within the run's plan (CPU; None: freed memory goes back
    #: to the OS after every step); see :func:`start_run`
    heap: HeapGuard | None = None

    def release(self) -> None:
        """After a step: hand freed heap pages back to the OS (CPU), where the guard says so."""
        if self.heap is not None:
            self.heap.check(self.device)
        else:
            release_freed(self.device)

    def factor(self, value: int) -> int:
        """Pixels of ``value`` per pixel of the lowest-resolution value."""
        return self.program.factor(value)

    def hw(self, value: int) -> tuple[int, int]:
        f = self.factor(value)
        return self.base_hw[0] * f, self.base_hw[1] * f

    def tiles(self, value: int) -> list[Region]:
        """The tile cores at ``value``'s resolution (one grid on the lowest resolution, scaled)."""
        f = self.factor(value)
        return [r.scaled(f) for r in grid(self.base_hw[0], self.base_hw[1], self.tile)]

    def tick(self) -> None:
        if self.cancel is not None and self.cancel():
            raise TilingCancelledError("cancelled between tiles")
        self.done += 1
        if self.heap is not None:  # after every tile: one tile's work between two checks
            self.heap.check(self.device)
        if self.progress is not None:
            self.progress(self.done, self.total)

    def drop(self, value: int) -> None:
        """Forget a whole value (and its statistics); a spilled one's file is closed."""
        v = self.values.pop(value, None)
        if isinstance(v, DiskValue):
            v.close()
        self.stats.pop(value, None)

    def result(self) -> torch.Tensor:
        """The program's output, in memory."""
        return resident(self.values[len(self.program.steps)])

    def affine(self, step: Step) -> tuple[torch.Tensor, torch.Tensor] | None:
        if step.norm is None:
            return None
        return norm_affine(self.stats[step.src], step.norm)


def _full(run: Run, value: int) -> Slab:
    h, w = run.hw(value)
    return Slab(run.values[value], Region(0, h, 0, w))


def _alias_output(run: Run, step: Step, index: int, out_shape: tuple[int, ...]) -> torch.Tensor | None:
    """Storage for a resnet's output inside its input's, when the input dies here and only its own
    pixel is read (identity or 1x1 shortcut) and it is the same size. (Not into a larger input:
    the view would keep the input's whole storage alive as long as the output, which the memory
    model does not count.)"""
    if step.skip is None or (step.shortcut is not None and step.shortcut.kernel_size != (1, 1)):
        return None
    if run.program.last_use()[step.skip] != index or step.skip == step.src:
        return None
    skip = run.values[step.skip]
    if not isinstance(skip, torch.Tensor) or not skip.is_contiguous():
        return None
    if skip.numel() != torch.Size(out_shape).numel():
        return None
    return skip.view(-1)[: torch.Size(out_shape).numel()].view(out_shape)


def run_steps(
    run: Run,
    first: int,
    last: int,
    on_value: Callable[[int, torch.Tensor | DiskValue], None] | None = None,
    *,
    spill: bool = False,
) -> None:
    """Execute steps ``first .. last-1``; value ``first`` must be in ``run.values``. ``on_value``
    sees each new value, whole (maybe spilled), right after it is produced. With ``spill``, the new
    values but the program's output go to ``run.spill`` (host memory or a file) instead of the
    store."""
    program = run.program
    last_use = program.last_use()
    need_stats = program.needs_stats()
    for i in range(first, last):
        step = program.steps[i]
        out_value = i + 1
        src = run.values[step.src]
        b = src.shape[0]
        spilled = spill and out_value < len(program.steps) and step.kind != "attn"
        h, w = run.hw(out_value)
        stats = ChannelStats(b, program.channels[out_value], run.device) if need_stats[out_value] else None
        if step.kind == "attn":
            out = _attention(run, step, i, stats)
        else:
            shape = (b, program.channels[out_value], h, w)
            if spilled:
                assert run.spill is not None, "a spill segment needs a spill store"
                out = run.spill.new(shape, src.dtype)
            else:
                out = _alias_output(run, step, i, shape)
            if out is None:
                out = torch.empty(shape, dtype=src.dtype, device=run.store)
            affine = run.affine(step)
            src_slab = _full(run, step.src)
            skip_slab = _full(run, step.skip) if step.skip is not None else None
            src_hw = run.hw(step.src)
            for core in run.tiles(out_value):
                y = compute(step, src_slab, core, src_hw, affine=affine, skip=skip_slab)
                if stats is not None:
                    stats.add(y)
                out[:, :, core.y0 : core.y1, core.x0 : core.x1] = y.to(run.store)
                run.tick()
        if stats is not None:
            run.stats[out_value] = stats
        run.values[out_value] = out
        if on_value is not None:
            on_value(out_value, out)
        for value in (step.src, step.skip):
            if value is not None and last_use[value] == i and value != out_value:
                run.drop(value)
        run.release()


def _attention(run: Run, step: Step, index: int, stats: ChannelStats | None) -> torch.Tensor:
    att = step.attention
    assert att is not None
    x = resident(run.values[step.src])
    b, c, h, w = x.shape
    heads = att.heads
    scale, shift = norm_affine(run.stats[step.src], att.norm)
    # q, k, v are built channels-last, so each is a contiguous [B, heads, HW, C/heads] token tensor
    # for scaled_dot_product_attention (non-contiguous tokens push it onto the math kernel, which
    # materialises the HW x HW score matrix).
    qkv = [torch.empty((b, h, w, c), dtype=x.dtype, device=run.device) for _ in range(3)]
    cores = run.tiles(step.src)
    for core in cores:
        t = apply_affine(x[:, :, core.y0 : core.y1, core.x0 : core.x1].to(run.device), scale, shift)
        for dst, module in zip(qkv, (att.q, att.k, att.v), strict=True):
            dst[:, core.y0 : core.y1, core.x0 : core.x1, :] = project(module, t).permute(0, 2, 3, 1)
        run.tick()

    def tokens(t: torch.Tensor) -> torch.Tensor:  # [B, H, W, C] -> [B, heads, HW, C/heads]
        t = t.view(b, h * w, heads, c // heads)
        return t.transpose(1, 2) if heads > 1 else t.view(b, 1, h * w, c)

    o = F.scaled_dot_product_attention(*(tokens(t) for t in qkv))
    del qkv
    o = (o.transpose(1, 2) if heads > 1 else o).reshape(b, h, w, c).to(x.dtype)
    out = x if run.program.last_use()[step.src] == index else torch.empty_like(x)
    for core in cores:
        ys, xs = slice(core.y0, core.y1), slice(core.x0, core.x1)
        y = project(att.out, o[:, ys, xs, :].permute(0, 3, 1, 2)).to(x.dtype) + x[:, :, ys, xs].to(run.device)
        if att.rescale != 1.0:
            y = y / att.rescale
        if stats is not None:
            stats.add(y)
        out[:, :, ys, xs] = y.to(run.store)
        run.tick()
    return out


def count_units(run: Run, first: int, last: int) -> int:
    n = 0
    for i in range(first, last):
        step = run.program.steps[i]
        n += len(run.tiles(i + 1)) * (2 if step.kind == "attn" else 1)
    return n


def run_exact(
    program: Program,
    x: torch.Tensor,
    *,
    tile: int,
    store: torch.device | None = None,
    progress: TileProgress | None = None,
    cancel: TileCancel | None = None,
) -> torch.Tensor:
    """Run ``program`` on ``x`` ``[B, C, H, W]`` in tiles of ``tile`` pixels at the program's lowest
    resolution (latent pixels). Equals the untiled forward up to float rounding."""
    run = start_run(program, x, tile, store, progress, cancel)
    run.total = count_units(run, 0, len(program.steps))
    run_steps(run, 0, len(program.steps))
    return run.result()


def start_run(
    program: Program,
    x: torch.Tensor,
    tile: int,
    store: torch.device | None,
    progress: TileProgress | None,
    cancel: TileCancel | None,
    spill: SpillStore | None = None,
    heap: HeapGuard | None = None,
) -> Run:
    """The state of a tiled call with its input in place (and that input's statistics, if a norm
    reads it); the executors set ``total`` and run the steps. ``heap``: keeps the process's
    resident set within the run's plan (CPU; None: freed memory goes back after every step)."""
    device = program.steps[0].conv.weight.device if program.steps[0].conv is not None else x.device
    run = Run(program, tile, _base_hw(program, x), device, store or device, progress, cancel, spill=spill)
    run.heap = heap if device.type == "cpu" else None
    run.values[0] = x.to(run.store)
    if program.needs_stats()[0]:
        run.stats[0] = ChannelStats(x.shape[0], x.shape[1], device)
        run.stats[0].add(x.to(device))
    return run


def _base_hw(program: Program, x: torch.Tensor) -> tuple[int, int]:
    low = min(program.scales)
    h, w = x.shape[-2:]
    bh, bw = h * low, w * low
    if bh.denominator != 1 or bw.denominator != 1:
        raise ValueError(f"input size {w}x{h} does not divide down to whole latent pixels")
    return int(bh), int(bw)
