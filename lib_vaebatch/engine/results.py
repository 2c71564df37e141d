"""What a batch job reports: per sample what happened, and the job as a whole."""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch


class Status(str, enum.Enum):
    OK = "ok"
    RECOVERED = "recovered"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass
class SampleReport:
    """One sample's outcome. ``dtype`` is the precision that produced the returned output."""

    index: int
    status: Status = Status.CANCELLED
    dtype: str | None = None
    tiled: bool = False
    message: str = ""
    #: what a tiled run ran: "exact", "exact-lean" (recomputation), "fast" or "plain" (independent
    #: tiles, the last resort); None when untiled.
    tile_mode: str | None = None

    @property
    def done(self) -> bool:
        return self.status in (Status.OK, Status.RECOVERED)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "status": self.status.value,
            "dtype": self.dtype,
            "tiled": self.tiled,
            "tile_mode": self.tile_mode,
            "message": self.message,
        }


@dataclass
class BatchResult:
    """Outputs (None where a sample failed or was cancelled) and per-sample reports."""

    outputs: list[torch.Tensor | None]
    reports: list[SampleReport]
    cancelled: bool = False
    chunk_sizes: list[int] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    start_dtype: str = ""
    end_dtype: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(r.done for r in self.reports)

    @property
    def done_indices(self) -> list[int]:
        return [r.index for r in self.reports if r.done]

    @property
    def failed(self) -> list[SampleReport]:
        return [r for r in self.reports if r.status is Status.FAILED]

    def summary(self) -> str:
        """Short text for infotext and logs, e.g. ``chunk 4, recovered bf16 ×2, tiled ×1``."""
        parts = []
        if self.chunk_sizes and max(self.chunk_sizes) > 1:  # one at a time is the webui's own way
            parts.append(f"chunk {max(self.chunk_sizes)}")
        recovered = Counter(r.dtype for r in self.reports if r.status is Status.RECOVERED)
        parts += [f"recovered {dt} ×{n}" for dt, n in sorted(recovered.items(), key=lambda kv: str(kv[0]))]
        if tiled := sum(r.tiled for r in self.reports):
            modes = Counter(r.tile_mode or "exact" for r in self.reports if r.tiled)
            if set(modes) == {"exact"}:
                parts.append(f"tiled ×{tiled}")
            else:
                order = ("exact", "exact-spill", "exact-lean", "fast", "plain")
                named = {"plain": "plain tiles"}
                detail = ", ".join(f"{named.get(m, m)} ×{modes[m]}" for m in order if m in modes)
                parts.append(f"tiled ×{tiled} ({detail})")
        if failed := len(self.failed):
            parts.append(f"failed ×{failed}")
        if self.cancelled:
            parts.append("cancelled")
        return ", ".join(parts) if parts else "on"
