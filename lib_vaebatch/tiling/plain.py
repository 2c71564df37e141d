"""Plain independent tiles: the peers' method, kept as the engine's very last resort.

Each tile of the input, with an overlap, runs through the whole program on its own (its
GroupNorms see only the tile), and the outputs are blended with linear ramps over the overlap, as
ComfyUI's single-pass tiled decode and diffusers' ``enable_tiling`` do. Memory is one tile's
untiled run plus the output; the result is *not* the untiled one (seams and per-tile colour
statistics), so the engine only falls back to it when every exact and fast variant has run out of
memory, and labels the sample "plain tiles".
"""

from __future__ import annotations

import torch

from lib_vaebatch.tiling.exact import TileCancel, TileProgress, TilingCancelledError, _base_hw, run_exact
from lib_vaebatch.tiling.program import Program

#: Overlap between tiles, as a share of the tile (ComfyUI: 64 with 16).
OVERLAP_SHARE = 0.25


def plain_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` covering ``length`` with at least ``overlap`` shared."""
    if length <= tile:
        return [0]
    stride = max(1, tile - overlap)
    n = -(-(length - tile) // stride) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def _ramp(length: int, before: int, after: int) -> torch.Tensor:
    """Weights along one axis of a tile: rising over ``before`` pixels, falling over ``after``."""
    w = torch.ones(length, dtype=torch.float32)
    if before:
        w[:before] = torch.arange(1, before + 1, dtype=torch.float32) / (before + 1)
    if after:
        w[length - after :] = torch.minimum(
            w[length - after :], torch.arange(after, 0, -1, dtype=torch.float32) / (after + 1)
        )
    return w


def run_plain(
    program: Program,
    x: torch.Tensor,
    *,
    tile: int,
    overlap: int | None = None,
    progress: TileProgress | None = None,
    cancel: TileCancel | None = None,
) -> torch.Tensor:
    """Run ``program`` on ``x`` as independent overlapping tiles of ``tile`` latent pixels."""
    low = min(program.scales)
    f_in = int(program.scales[0] / low)
    f_out = int(program.scales[-1] / low)
    bh, bw = _base_hw(program, x)
    th, tw = min(tile, bh), min(tile, bw)
    ov = overlap if overlap is not None else max(1, round(tile * OVERLAP_SHARE))
    ys, xs = plain_starts(bh, th, ov), plain_starts(bw, tw, ov)
    b = x.shape[0]
    out: torch.Tensor | None = None
    weight = torch.zeros((1, 1, bh * f_out, bw * f_out), dtype=torch.float32, device=x.device)
    total, done = len(ys) * len(xs), 0
    for iy, y0 in enumerate(ys):
        for ix, x0 in enumerate(xs):
            if cancel is not None and cancel():
                raise TilingCancelledError("cancelled between tiles")
            crop = x[:, :, y0 * f_in : (y0 + th) * f_in, x0 * f_in : (x0 + tw) * f_in]
            y = run_exact(program, crop, tile=max(th, tw)).to(torch.float32)
            if out is None:
                out = torch.zeros(
                    (b, y.shape[1], bh * f_out, bw * f_out), dtype=torch.float32, device=x.device
                )
            # ramps only where a neighbour overlaps, by the overlap actually shared
            up = (ys[iy - 1] + th - y0) * f_out if iy else 0
            down = (y0 + th - ys[iy + 1]) * f_out if iy + 1 < len(ys) else 0
            left = (xs[ix - 1] + tw - x0) * f_out if ix else 0
            right = (x0 + tw - xs[ix + 1]) * f_out if ix + 1 < len(xs) else 0
            wy = _ramp(th * f_out, max(0, up), max(0, down)).to(x.device)
            wx = _ramp(tw * f_out, max(0, left), max(0, right)).to(x.device)
            w = (wy[:, None] * wx[None, :])[None, None]
            ry, rx = slice(y0 * f_out, (y0 + th) * f_out), slice(x0 * f_out, (x0 + tw) * f_out)
            out[:, :, ry, rx] += y.to(x.device) * w
            weight[:, :, ry, rx] += w
            del y
            done += 1
            if progress is not None:
                progress(done, total)
    assert out is not None
    return (out / weight).to(x.dtype)
