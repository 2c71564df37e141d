"""Regions of values and the computation of one step over one region.

A step's output over a region is computed from its input cropped to the region it needs (the
conv's padding as a halo on interior sides, the true zero padding at the image border), by calling
the module's own conv on the crop and cropping its output. So every conv sees one tile plus its
halo, and the result equals the untiled computation exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lib_vaebatch.tiling.program import Step


@dataclass(frozen=True)
class Region:
    """Rows ``y0:y1`` and columns ``x0:x1`` of a value, in that value's own pixels."""

    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    def expand(self, by: int, height: int, width: int) -> Region:
        return Region(
            max(0, self.y0 - by), min(height, self.y1 + by), max(0, self.x0 - by), min(width, self.x1 + by)
        )

    def union(self, other: Region | None) -> Region:
        if other is None:
            return self
        return Region(
            min(self.y0, other.y0), max(self.y1, other.y1), min(self.x0, other.x0), max(self.x1, other.x1)
        )

    def contains(self, other: Region) -> bool:
        return self.y0 <= other.y0 and other.y1 <= self.y1 and self.x0 <= other.x0 and other.x1 <= self.x1

    def scaled(self, factor: int) -> Region:
        return Region(self.y0 * factor, self.y1 * factor, self.x0 * factor, self.x1 * factor)

    def relative_to(self, outer: Region) -> tuple[slice, slice]:
        return slice(self.y0 - outer.y0, self.y1 - outer.y0), slice(self.x0 - outer.x0, self.x1 - outer.x0)


@dataclass
class Slab:
    """A tensor ``[B, C, h, w]`` holding ``region`` of a value."""

    data: torch.Tensor
    region: Region

    def crop(self, region: Region) -> torch.Tensor:
        if not self.region.contains(region):
            raise AssertionError(f"slab {self.region} does not hold {region}")
        ys, xs = region.relative_to(self.region)
        return self.data[:, :, ys, xs]


def input_regions(step: Step, out: Region, src_hw: tuple[int, int]) -> tuple[Region, Region | None]:
    """What a step needs to produce ``out``: a region of its source and (if any) of its skip value."""
    h, w = src_hw
    if step.kind == "conv":
        src = out.expand(step.padding, h, w)
    elif step.kind == "up":
        up = out.expand(step.padding, 2 * h, 2 * w)
        src = Region(up.y0 // 2, (up.y1 + 1) // 2, up.x0 // 2, (up.x1 + 1) // 2)
    elif step.kind == "down":
        src = Region(2 * out.y0, min(h, 2 * out.y1 + 1), 2 * out.x0, min(w, 2 * out.x1 + 1))
    else:  # attention reads everything
        src = Region(0, h, 0, w)
    skip = None
    if step.skip is not None:
        pad = 0 if step.shortcut is None else int(step.shortcut.padding[0])
        skip = out.expand(pad, h, w)
    return src, skip


def _run_conv(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    weight = conv.weight
    return conv(x.to(device=weight.device, dtype=weight.dtype))


def compute(
    step: Step,
    src: Slab,
    out: Region,
    src_hw: tuple[int, int],
    *,
    affine: tuple[torch.Tensor, torch.Tensor] | None = None,
    skip: Slab | None = None,
) -> torch.Tensor:
    """The output of a conv/up/down step over ``out`` (``[B, C_out, out.height, out.width]``)."""
    from lib_vaebatch.tiling.stats import apply_affine

    h, w = src_hw
    need, need_skip = input_regions(step, out, src_hw)
    assert step.conv is not None
    x = src.crop(need)
    if x.device != step.conv.weight.device:  # a whole value kept on the host (spilled)
        x = x.to(step.conv.weight.device)
    if step.norm is not None:
        assert affine is not None, f"{step.name}: statistics missing"
        scale, shift = affine
        x = apply_affine(x.to(scale.device) if x.device != scale.device else x, scale, shift)
    if step.act:
        x = F.silu(x, inplace=step.norm is not None)  # in place only on our own normalised copy
    if step.kind == "conv":
        y = _run_conv(step.conv, x)
        ys, xs = out.relative_to(need)
    elif step.kind == "up":
        up_region = out.expand(step.padding, 2 * h, 2 * w)
        u = F.interpolate(x, scale_factor=2.0, mode="nearest")
        ys, xs = up_region.relative_to(need.scaled(2))
        y = _run_conv(step.conv, u[:, :, ys, xs])
        ys, xs = out.relative_to(up_region)
    else:  # down: the module pads right and bottom by one at the border, then a stride-2 conv
        pad_y = max(0, 2 * out.y1 + 1 - h)
        pad_x = max(0, 2 * out.x1 + 1 - w)
        if pad_y or pad_x:
            x = F.pad(x, (0, pad_x, 0, pad_y))
        return _add_skip(step, _run_conv(step.conv, x), out, skip, need_skip)
    return _add_skip(step, y[:, :, ys, xs], out, skip, need_skip)


def _add_skip(
    step: Step, y: torch.Tensor, out: Region, skip: Slab | None, need: Region | None
) -> torch.Tensor:
    if step.skip is None:
        return y
    assert skip is not None and need is not None
    s = skip.crop(need)
    if s.device != y.device:
        s = s.to(y.device)
    if step.shortcut is not None:
        s = _run_conv(step.shortcut, s)
        ys, xs = out.relative_to(need)
        s = s[:, :, ys, xs]
    y = s.to(y.dtype) + y
    return y / step.scale if step.scale != 1.0 else y


def project(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An attention projection on ``[B, C, h, w]``: Linear over channels, or the 1x1 conv itself."""
    if isinstance(module, torch.nn.Linear):
        return module(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return _run_conv(module, x)  # type: ignore[arg-type]


def tile_edges(length: int, tile: int) -> list[int]:
    """Split ``length`` into ``ceil(length / tile)`` near-equal parts; returns the boundaries."""
    n = max(1, -(-length // max(1, tile)))
    return [round(i * length / n) for i in range(n + 1)]


def grid(height: int, width: int, tile: int) -> list[Region]:
    """Tiles covering ``height x width`` in row-major order, each at most ``tile`` on a side."""
    ys = tile_edges(height, tile)
    xs = tile_edges(width, tile)
    return [
        Region(ys[i], ys[i + 1], xs[j], xs[j + 1]) for i in range(len(ys) - 1) for j in range(len(xs) - 1)
    ]


#: With at most this many tiles, fast mode samples them all (its statistics are then exact).
MIN_SAMPLE_TILES = 8


def sample_tiles(rows: int, cols: int) -> list[int]:
    """Tile indices (row-major) whose statistics stand for the whole image: all tiles when there
    are few, every other row and column on large grids, else a checkerboard."""
    total = rows * cols
    if total <= MIN_SAMPLE_TILES:
        return list(range(total))
    sparse = [r * cols + c for r in range(0, rows, 2) for c in range(0, cols, 2)]
    if len(sparse) >= MIN_SAMPLE_TILES:
        return sparse
    return [r * cols + c for r in range(rows) for c in range(cols) if (r + c) % 2 == 0]
