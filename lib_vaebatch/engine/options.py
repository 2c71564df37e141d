"""Engine options, shared by the CLI, the apps, the API and the webui script."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from lib_vaebatch.devices import parse_dtype

ChunkMode = Literal["auto", "per-sample"]
TilingMode = Literal["auto", "always", "never"]
TileMode = Literal["exact", "exact-lean", "fast", "auto", "plain"]
TILE_MODES: tuple[str, ...] = ("exact", "exact-lean", "fast", "auto", "plain")
CpuLayout = Literal["auto", "contiguous", "channels-last"]

DEFAULT_LADDER: tuple[str, ...] = ("bf16", "fp32")


@dataclass
class EngineOptions:
    """How a batch is run. Every field has a default; :meth:`from_mapping` takes them by name."""

    #: "auto" plans the chunk from the memory model; "per-sample" decodes one at a time, exactly as
    #: A1111's decode_latent_batch does (same order, same calls, same outputs).
    chunk_mode: ChunkMode = "auto"
    #: Upper bound on the chunk size (None: no bound beyond memory).
    max_chunk: int | None = None
    #: Check every output sample for NaN/Inf (anywhere, not only the first element).
    nan_check: bool = True
    #: Precisions to retry non-finite samples in, in order; only rungs more robust than the current
    #: dtype (fp16 < bf16 < fp32) that the device supports are tried.
    ladder: tuple[str, ...] = DEFAULT_LADDER
    #: After a recovery, keep the VAE in the recovered precision once the job ends (A1111's
    #: behaviour); False restores the original precision.
    keep_recovered_dtype: bool = False
    #: After a recovery, run the rest of the job in the recovered precision (A1111 does the same
    #: within a batch); False goes back to the original precision for the remaining samples.
    escalate_remaining: bool = True
    #: Where finished samples go: "cpu" (default; pinned, overlapped copies on CUDA) or "device".
    offload: str = "cpu"
    #: From CUDA to the CPU: copy through pinned buffers on a side stream, overlapping the next
    #: chunk (False: plain synchronous copies, for comparison).
    overlap_offload: bool = True
    #: dtype of returned samples.
    output_dtype: str = "fp32"
    #: "auto": tiles only when needed (OOM at chunk 1, or one sample over budget); "always"; "never".
    tiling: TilingMode = "auto"
    #: "exact": tiled output equals untiled (where whole values do not fit the budget, they are
    #: spilled, see ``spill``: "exact-spill", or parts are recomputed: "exact-lean", slower);
    #: "fast": high-resolution stage in independent tiles with estimated statistics (close but
    #: not identical output); "auto": exact where it fits the
    #: budget, else fast; "plain": independent tiles blended over an overlap (the peers' method,
    #: not exact: for comparison). Whatever is chosen, after out-of-memory errors the engine steps
    #: down to leaner variants, ending with plain tiles, and reports what ran.
    tile_mode: TileMode = "exact"
    #: Exact tiles may keep whole values that do not fit the budget outside it: in host memory on
    #: CUDA, in a temporary file on the CPU (directory: $VAEBATCH_SPILL_DIR, else the system's temp
    #: directory; unlinked at once, at most half its free space). False: recompute instead.
    spill: bool = True
    #: Tile size in latent pixels (image pixels / 8), at least 8 (None: planned from free memory).
    tile_size: int | None = None
    #: Share of free memory a chunk may plan for.
    memory_fraction: float = 0.8
    #: Fixed memory budget in bytes instead of querying free memory (tests, benchmarks).
    memory_budget: int | None = None
    #: On CUDA, measure the first chunk of each shape (peak allocated) and plan with the measurement.
    calibrate: bool = True
    #: On the CPU, the memory layout of module VAEs: "auto" times the first calls of each input
    #: shape in contiguous and channels_last and keeps the faster (per-sample mode: contiguous, for
    #: A1111's exact outputs); "contiguous" or "channels-last" force one.
    cpu_layout: CpuLayout = "auto"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.chunk_mode not in ("auto", "per-sample"):
            raise ValueError(f"chunk_mode must be 'auto' or 'per-sample', not {self.chunk_mode!r}")
        if self.max_chunk is not None and (not isinstance(self.max_chunk, int) or self.max_chunk < 1):
            raise ValueError(f"max_chunk must be a positive integer, not {self.max_chunk!r}")
        if self.tiling not in ("auto", "always", "never"):
            raise ValueError(f"tiling must be auto, always or never, not {self.tiling!r}")
        if self.tile_mode not in TILE_MODES:
            raise ValueError(f"tile_mode must be one of {', '.join(TILE_MODES)}, not {self.tile_mode!r}")
        if self.tile_size is not None and (not isinstance(self.tile_size, int) or self.tile_size < 8):
            raise ValueError(f"tile_size is in latent pixels and must be >= 8, not {self.tile_size!r}")
        if self.cpu_layout not in ("auto", "contiguous", "channels-last"):
            raise ValueError(f"cpu_layout must be auto, contiguous or channels-last, not {self.cpu_layout!r}")
        if not 0.05 <= float(self.memory_fraction) <= 1.0:
            raise ValueError(f"memory_fraction must be within 0.05..1, not {self.memory_fraction!r}")
        if isinstance(self.ladder, str):
            self.ladder = tuple(s for s in self.ladder.replace(" ", "").split(",") if s)
        self.ladder = tuple(self.ladder)
        for name in self.ladder:
            parse_dtype(name)
        parse_dtype(self.output_dtype)
        if self.offload not in ("cpu", "device") and not str(self.offload).startswith(("cuda", "mps")):
            raise ValueError(f"offload must be 'cpu' or 'device', not {self.offload!r}")

    @property
    def ladder_dtypes(self) -> tuple[torch.dtype, ...]:
        return tuple(parse_dtype(n) for n in self.ladder)

    @property
    def out_dtype(self) -> torch.dtype:
        return parse_dtype(self.output_dtype)

    @classmethod
    def from_mapping(cls, values: dict[str, Any] | None) -> EngineOptions:
        """Build from a name->value mapping (API payloads); unknown names are an error."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown engine option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**values)

    def replace(self, **changes: Any) -> EngineOptions:
        return dataclasses.replace(self, **changes)
