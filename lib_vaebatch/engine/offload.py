"""Moving finished samples off the VAE's device as soon as they exist.

On CUDA the copy goes through pinned staging buffers on a side stream, so the copy of chunk k runs
while chunk k+1 decodes; the finite-check flags travel with it, so reading them does not stall the
decode stream either.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Landed:
    """A chunk's outputs on the target device, one tensor per sample, and their finite flags."""

    samples: list[torch.Tensor]
    finite: list[bool]


class Pending:
    """An in-flight copy; :meth:`wait` returns the landed chunk (idempotent)."""

    def __init__(self, finish: Callable[[], Landed]) -> None:
        self._finish: Callable[[], Landed] | None = finish
        self._landed: Landed | None = None

    def wait(self) -> Landed:
        if self._finish is not None:
            self._landed = self._finish()
            self._finish = None
        assert self._landed is not None
        return self._landed


def finite_flags(x: torch.Tensor) -> torch.Tensor:
    """Per sample: True when every element is finite (any NaN or Inf anywhere fails the sample)."""
    return torch.isfinite(x).flatten(1).all(dim=1)


class Offloader:
    """Delivers chunk outputs to ``target`` in ``out_dtype``."""

    def __init__(
        self, source: torch.device, target: torch.device, out_dtype: torch.dtype, *, overlap: bool = True
    ) -> None:
        self.source = source
        self.target = target
        self.out_dtype = out_dtype
        self._pinned = overlap and source.type == "cuda" and target.type == "cpu"
        self._stream: torch.cuda.Stream | None = None
        self._free: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = {}

    @property
    def asynchronous(self) -> bool:
        """Whether a submitted copy runs while the caller goes on (CUDA -> pinned CPU)."""
        return self._pinned

    def submit(self, out: torch.Tensor, check: bool) -> Pending:
        out = out.to(self.out_dtype) if out.dtype != self.out_dtype else out
        flags = finite_flags(out) if check else None
        if self._pinned:
            return self._submit_pinned(out, flags)
        moved = out.to(self.target).contiguous()  # a batched CPU conv may return channels_last
        flag_list = flags.tolist() if flags is not None else [True] * out.shape[0]
        landed = Landed(list(moved.unbind(0)), flag_list)
        return Pending(lambda: landed)

    # -- CUDA -> CPU ---------------------------------------------------------------------------
    def _staging(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        pool = self._free.setdefault((shape, dtype), [])
        return pool.pop() if pool else torch.empty(shape, dtype=dtype, pin_memory=True)

    def _submit_pinned(self, out: torch.Tensor, flags: torch.Tensor | None) -> Pending:
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.source)
        stream = self._stream
        host = self._staging(tuple(out.shape), out.dtype)
        host_flags = (
            torch.empty(out.shape[0], dtype=torch.bool, pin_memory=True) if flags is not None else None
        )
        stream.wait_stream(torch.cuda.current_stream(self.source))
        with torch.cuda.stream(stream):
            host.copy_(out, non_blocking=True)
            if flags is not None and host_flags is not None:
                host_flags.copy_(flags, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        # The decode stream may reuse these blocks only after the copy has read them.
        out.record_stream(stream)
        if flags is not None:
            flags.record_stream(stream)

        def finish() -> Landed:
            done.synchronize()
            samples = [s.clone() for s in host.unbind(0)]  # pageable copies; the staging buffer is reused
            self._free[(tuple(host.shape), host.dtype)].append(host)
            finite = host_flags.tolist() if host_flags is not None else [True] * len(samples)
            return Landed(samples, finite)

        return Pending(finish)
