"""Tiled decode and encode whose output matches the untiled one.

``exact`` mode runs the VAE one step at a time over the whole image in tiles, with GroupNorm
statistics gathered from all tile cores: the result equals the untiled forward up to float rounding.
``fast`` mode runs the high-resolution stage as independent tiles with estimated statistics (see
:mod:`lib_vaebatch.tiling.fast`). Both call the module's own layers, in diffusers or ldm/sgm/SD3
layout (:mod:`lib_vaebatch.tiling.program`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lib_vaebatch.tiling.exact import TileCancel, TileProgress, TilingCancelledError, _base_hw, run_exact
from lib_vaebatch.tiling.fast import default_segment, run_fast
from lib_vaebatch.tiling.plan import (
    DEFAULT_WORKSPACE_FACTOR,
    MIN_TILE,
    calibrate,
    calibration_factor,
    estimate_peak,
    plan_tile,
)
from lib_vaebatch.tiling.program import Program, TilingUnsupportedError, decoder_program, encoder_program

__all__ = [
    "MIN_TILE",
    "Program",
    "TileSettings",
    "TilingCancelledError",
    "TilingUnsupportedError",
    "decoder_program",
    "encoder_program",
    "estimate_peak",
    "run_tiled",
]

TileMode = Literal["exact", "fast"]


@dataclass
class TileSettings:
    """How to tile one call: mode, tile size in latent pixels (None: planned from ``budget``),
    ``max_tile`` a cap learnt from an out-of-memory error (it wins over a given or planned size).
    ``used_tile`` is filled in with the tile size the call actually ran with."""

    mode: TileMode = "exact"
    tile_size: int | None = None
    budget: int | None = None
    progress: TileProgress | None = None
    cancel: TileCancel | None = None
    max_tile: int | None = None
    used_tile: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("exact", "fast"):
            raise ValueError(f"tile mode must be 'exact' or 'fast', not {self.mode!r}")
        for name in ("tile_size", "max_tile"):
            value = getattr(self, name)
            if value is not None and value < MIN_TILE:
                raise ValueError(f"tile size is in latent pixels and must be >= {MIN_TILE}, not {value}")


@dataclass
class TilePlan:
    tile: int
    planned_bytes: int
    segment: tuple[int, int] | None


def plan(program: Program, x: torch.Tensor, settings: TileSettings, key: object = None) -> TilePlan:
    """Tile size (given, or the largest whose planned peak fits the budget) for ``x``."""
    base = _base_hw(program, x)
    segment = default_segment(program) if settings.mode == "fast" else None
    kw = {"batch": x.shape[0], "dtype": x.dtype, "mode": settings.mode, "segment": segment}
    factor = calibration_factor(key, settings.mode, x.dtype) if key is not None else None
    if settings.tile_size is not None:
        tile = settings.tile_size
    else:
        budget = settings.budget if settings.budget is not None else 1 << 62
        tile = plan_tile(program, base, budget, factor=factor, **kw)[0]  # type: ignore[arg-type]
    if settings.max_tile is not None:
        tile = min(tile, settings.max_tile)
    peak = estimate_peak(program, base, tile, factor=factor or DEFAULT_WORKSPACE_FACTOR, **kw)  # type: ignore[arg-type]
    return TilePlan(tile, peak, segment)


def run_tiled(
    program: Program, x: torch.Tensor, settings: TileSettings, *, key: object = None
) -> torch.Tensor:
    """Run ``program`` on ``x`` in tiles. On CUDA the first run per (module, mode, dtype) also
    calibrates the memory model from the measured peak."""
    p = plan(program, x, settings, key)
    settings.used_tile = max(MIN_TILE, min(p.tile, max(_base_hw(program, x))))

    def execute() -> torch.Tensor:
        if settings.mode == "fast":
            return run_fast(program, x, tile=p.tile, segment=p.segment, progress=settings.progress,
                            cancel=settings.cancel)  # fmt: skip
        return run_exact(program, x, tile=p.tile, progress=settings.progress, cancel=settings.cancel)

    if (
        key is not None
        and x.device.type == "cuda"
        and calibration_factor(key, settings.mode, x.dtype) is None
    ):
        result: list[torch.Tensor] = []
        calibrate(key, program, x, _base_hw(program, x), p.tile, settings.mode, p.segment,
                  lambda: result.append(execute()))  # fmt: skip
        return result[0]
    return execute()
