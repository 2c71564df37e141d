"""The chunk loop shared by batch decode and batch encode.

For each chunk: run it, check every sample for NaN/Inf, and send the outputs to the target device;
on CUDA the copy and check of chunk k overlap the run of chunk k+1; on the CPU an untiled chunk keeps
its freed memory for reuse during the call (lib_vaebatch/heap.py). Non-finite samples are re-run,
and only those, up the precision ladder. An out-of-memory error halves the chunk (after the
exception has been left, so its frames and the failed allocation are freed) down to 1, then hands
the sample to the backend's tiled path. Finished samples are never thrown away: a failure, an OOM
or a cancel only ever affects the samples not yet done.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from lib_vaebatch.backends.base import Op, VAEBackend
from lib_vaebatch.devices import dtype_name, empty_cache, free_memory, is_oom, resolve_device, robustness
from lib_vaebatch.engine.offload import Offloader, Pending
from lib_vaebatch.engine.options import EngineOptions
from lib_vaebatch.engine.planner import Plan, memory_budget, plan_chunk, record_measurement
from lib_vaebatch.engine.results import BatchResult, SampleReport, Status
from lib_vaebatch.heap import REUSE_SLACK, reuse_freed
from lib_vaebatch.tiling import MIN_TILE, SpillError, TileSettings, TilingCancelledError, default_store

log = logging.getLogger("vaebatch")

#: ``fn(inputs[indices], indices, tiles)`` -> outputs on the VAE's device, one row per index;
#: ``tiles`` is None for an untiled run.
ChunkFn = Callable[[torch.Tensor, list[int], "TileSettings | None"], torch.Tensor]
#: ``progress(done, total, text)``
ProgressFn = Callable[[int, int, str], None]
#: ``cancel()`` -> True to stop before the next chunk.
CancelFn = Callable[[], bool]
#: ``on_sample(index, output, report)`` as soon as a sample is final (ok or recovered).
SampleFn = Callable[[int, torch.Tensor, SampleReport], None]


@dataclass
class _Outcome:
    indices: list[int]
    samples: list[torch.Tensor | None]
    finite: list[bool]
    dtype: torch.dtype
    tiled: bool = False
    error: str | None = None
    cancelled: bool = False
    tile_mode: str | None = None


@dataclass
class _Launch:
    pending: Pending | None = None
    error: str | None = None
    oom: bool = False
    cancelled: bool = False
    tile: int | None = None  # the tile size a tiled launch ran with
    mode: str | None = None  # what a tiled launch ran: exact, exact-spill, exact-lean, fast or plain
    planned: int | None = None  # its planned peak bytes
    least: int | None = None  # the lowest planned peak of that mode for this input
    spill_failed: bool = False  # the spill store failed (full disk, file size limit, I/O error)


def _label(mode: str | None) -> str:
    """How a tile mode reads in events and reports."""
    return {
        "plain": "plain tiles",
        "fast": "fast tiles",
        "exact-lean": "exact-lean tiles",
        "exact-spill": "exact-spill tiles",
    }.get(mode or "exact", "tiles")


def _non_finite_counts(x: torch.Tensor) -> str:
    nan = int(torch.isnan(x).sum())
    inf = int(torch.isinf(x).sum())
    return f"NaN: {nan}, Inf: {inf}"


class BatchRunner:
    """Runs ``fn`` over ``inputs`` (indexed along dim 0) in planned chunks."""

    def __init__(
        self,
        backend: VAEBackend,
        op: Op,
        inputs: torch.Tensor,
        fn: ChunkFn,
        *,
        pixels: int,
        options: EngineOptions | None = None,
        progress: ProgressFn | None = None,
        cancel: CancelFn | None = None,
        on_sample: SampleFn | None = None,
        keep_outputs: bool = True,
    ) -> None:
        self.backend = backend
        self.op = op
        self.inputs = inputs
        self.fn = fn
        self.pixels = pixels
        self.options = options or EngineOptions()
        self.progress = progress
        self.cancel = cancel
        self.on_sample = on_sample
        self.keep_outputs = keep_outputs
        n = int(inputs.shape[0])
        self.n = n
        self.outputs: list[torch.Tensor | None] = [None] * n
        self.reports = [SampleReport(i) for i in range(n)]
        self.events: list[str] = []
        self.chunk_sizes: list[int] = []
        self._awaiting_recovery: set[int] = set()
        self._cap: int | None = None  # chunk limit learnt from an out-of-memory error
        self._force_tiled = False
        self._tile_cap: int | None = None  # tile-size limit learnt from an out-of-memory error
        self._tile_bytes: int | None = None  # planned-peak limit learnt from an out-of-memory error
        self._no_spill = False  # the spill store failed in this job: the rest runs without it
        self._tile_rung: str | None = None  # "fast" or "plain" once the user's tile mode ran out
        self._cancelled = False
        target = backend.device if self.options.offload == "device" else resolve_device(self.options.offload)
        self._offloader = Offloader(
            backend.device, target, self.options.out_dtype, overlap=self.options.overlap_offload
        )

    # -- public --------------------------------------------------------------------------------
    def run(self) -> BatchResult:
        start = time.perf_counter()
        start_dtype = self.backend.dtype
        try:
            self.backend.reserve(self.op, self.pixels)
            with self.backend.inference(), self.backend.prepare_for_speed(self._layout()):
                # Look one chunk ahead only where copies are asynchronous: chunk k is checked while
                # chunk k+1 runs. (On the CPU nothing would overlap, so precision escalation
                # after a recovery applies from the very next chunk, as in A1111.)
                overlapped = self._offloader.asynchronous
                for outcome in self._chunks(list(range(self.n)), overlapped=overlapped):
                    bad = self._accept(outcome, recovered_from=None)
                    if bad:
                        self._recover(bad, outcome.dtype)
        finally:
            if not self.options.keep_recovered_dtype and self.backend.dtype != start_dtype:
                self._set_dtype(start_dtype, "restoring the original precision after the job")
        for rep in self.reports:
            if rep.status is Status.CANCELLED and not rep.message:
                rep.message = "cancelled before it ran"
        return BatchResult(
            outputs=self.outputs,
            reports=self.reports,
            cancelled=self._cancelled,
            chunk_sizes=self.chunk_sizes,
            events=self.events,
            start_dtype=dtype_name(start_dtype),
            end_dtype=dtype_name(self.backend.dtype),
            seconds=time.perf_counter() - start,
        )

    def _layout(self) -> str:
        # per-sample mode promises A1111's outputs bit for bit: the module's own layout.
        if self.options.cpu_layout == "auto" and self.options.chunk_mode == "per-sample":
            return "contiguous"
        return self.options.cpu_layout

    # -- planning ------------------------------------------------------------------------------
    def plan(self, remaining: int) -> Plan:
        return plan_chunk(self.backend, self.op, self.pixels, remaining, self.options, cap=self._cap)

    def _tiled_now(self, plan: Plan) -> bool:
        tiling = self.options.tiling
        if tiling == "never":
            return False
        if tiling == "always" or self._force_tiled:
            return True
        return plan.over_budget and self.backend.supports_tiling(self.op)

    # -- the loop ------------------------------------------------------------------------------
    def _is_cancelled(self) -> bool:
        if not self._cancelled and self.cancel is not None and self.cancel():
            self._cancelled = True
            self.events.append("cancelled: stopping after the current chunk")
        return self._cancelled

    def _chunks(self, indices: list[int], *, overlapped: bool) -> Iterator[_Outcome]:
        todo = deque(indices)
        inflight: deque[tuple[list[int], Pending, torch.dtype, bool, str | None]] = deque()
        isolate = 0  # after a non-OOM error in a chunk: run this many samples one at a time
        while todo:
            if self._is_cancelled():
                break
            plan = self.plan(len(todo))
            tiled = self._tiled_now(plan)
            size = 1 if (tiled or isolate) else plan.chunk
            idx = [todo.popleft() for _ in range(min(size, len(todo)))]
            isolate = max(0, isolate - len(idx))
            dtype = self.backend.dtype
            launch = self._launch(idx, tiled, plan)
            if launch.pending is not None:
                inflight.append((idx, launch.pending, dtype, tiled, launch.mode))
                if not overlapped or len(inflight) > 1:
                    yield self._land(*inflight.popleft())
                continue
            # Something failed: settle the work in flight first; the exception is already gone.
            while inflight:
                yield self._land(*inflight.popleft())
            error, oom = launch.error, launch.oom
            if launch.cancelled:
                todo.extendleft(reversed(idx))
                break
            if launch.spill_failed:
                self._no_spill = True
                self.events.append(f"{error}; sample {idx[0]} runs again without spilling (recomputing)")
                todo.appendleft(idx[0])
                continue
            if oom:
                empty_cache(self.backend.device)
                if len(idx) > 1:
                    self._cap = max(1, len(idx) // 2)
                    self.events.append(f"out of memory at chunk {len(idx)}; retrying with chunk {self._cap}")
                    todo.extendleft(reversed(idx))
                elif not tiled and self.options.tiling != "never" and self.backend.supports_tiling(self.op):
                    self._force_tiled = True
                    self.events.append(f"out of memory at chunk 1; {self.op} continues in tiles")
                    todo.appendleft(idx[0])
                elif tiled and (step := self._step_down(launch)) is not None:
                    self.events.append(step)
                    todo.appendleft(idx[0])
                else:
                    why = "tiling is off" if self.options.tiling == "never" else "no tiled path for this VAE"
                    if tiled:
                        why = f"even in {_label(launch.mode)} of {launch.tile or MIN_TILE}"
                    yield _Outcome(
                        idx, [None], [False], dtype, tiled, f"out of memory at chunk size 1 ({why})"
                    )
            elif len(idx) > 1:
                self.events.append(f"{error} in a chunk of {len(idx)}; retrying those samples one at a time")
                isolate = len(idx)
                todo.extendleft(reversed(idx))
            else:
                yield _Outcome(idx, [None], [False], dtype, tiled, error)
        while inflight:
            yield self._land(*inflight.popleft())

    def _launch(self, idx: list[int], tiled: bool, plan: Plan) -> _Launch:
        """Run one chunk. Never raises for backend errors, so no exception (and no frame holding
        tensors) outlives this call and a retry starts with that memory freed."""
        x = self.inputs[idx[0] : idx[-1] + 1] if idx == list(range(idx[0], idx[-1] + 1)) else self.inputs[idx]
        tiles = self._tile_settings(idx) if tiled else None
        measure = not tiled and self._should_measure()
        before = self._peak_reset() if measure else 0
        try:
            with reuse_freed(self._reuse_device(idx, plan) if tiles is None else None):
                out = self.fn(x, idx, tiles)
            pending = self._offloader.submit(out, check=self.options.nan_check)
        except TilingCancelledError:
            self._cancelled = True
            self.events.append(f"cancelled between tiles of sample {idx[0]}")
            return _Launch(cancelled=True)
        except Exception as exc:
            if is_oom(exc):
                if tiles is None:
                    return _Launch(error="out of memory", oom=True)
                return _Launch(error="out of memory", oom=True, tile=tiles.used_tile, mode=tiles.used_mode,
                               planned=tiles.planned_bytes, least=tiles.least_bytes)  # fmt: skip
            log.debug("chunk %s failed", idx, exc_info=True)
            text = str(exc).splitlines()[0] if str(exc) else ""
            if isinstance(exc, SpillError) and tiles is not None and tiles.spill is not None:
                return _Launch(error=text, spill_failed=True)
            return _Launch(error=f"{type(exc).__name__}: {text}".rstrip(": "))
        if measure:
            pending.wait()
            peak = torch.cuda.max_memory_allocated(self.backend.device) - before
            record_measurement(self.backend, self.op, self.pixels, len(idx), peak)
            self.events.append(
                f"measured {peak / 2**20:.0f} MiB for a chunk of {len(idx)}: memory model calibrated"
            )
        self.chunk_sizes.append(len(idx))
        return _Launch(pending=pending, mode=tiles.used_mode if tiles is not None else None)

    def _reuse_device(self, idx: list[int], plan: Plan) -> torch.device | None:
        """The device on which an untiled chunk keeps freed memory for reuse during the call
        (lib_vaebatch/heap.py acts on the CPU), None where its planned memory leaves too little
        room for the heap's fragmentation."""
        planned = len(idx) * plan.per_sample_bytes + plan.fixed_bytes
        return self.backend.device if planned * REUSE_SLACK <= plan.budget_bytes else None

    def _tile_settings(self, idx: list[int]) -> TileSettings:
        def progress(done: int, total: int) -> None:
            if self.progress is not None:
                settled = sum(r.status is not Status.CANCELLED for r in self.reports) - len(
                    self._awaiting_recovery
                )
                self.progress(
                    settled, self.n, f"{self.op} {settled}/{self.n}, sample {idx[0]}: tile {done}/{total}"
                )

        def cancel() -> bool:
            return self.cancel is not None and bool(self.cancel())

        budget = memory_budget(self.backend, self.options)
        if self._tile_bytes is not None:
            budget = min(budget, self._tile_bytes)
        spill = None
        if self.options.spill and not self._no_spill and self.options.tile_mode != "exact-lean":
            device = self.backend.device
            host = free_memory(torch.device("cpu")) if device.type == "cuda" else None
            spill = default_store(device, host)
        return TileSettings(
            spill=spill,
            mode=self._tile_rung or self.options.tile_mode,  # type: ignore[arg-type]
            tile_size=self.options.tile_size if self._tile_rung is None else None,
            max_tile=self._tile_cap,
            budget=budget,
            progress=progress,
            cancel=cancel,
        )

    def _step_down(self, launch: _Launch) -> str | None:
        """The next rung after an out-of-memory error inside tiles, as an event line (None: none
        left). Smaller tiles; then, in exact mode, schedules within half the planned peak (whole
        values traded for recomputation) down to the leanest; then fast mode; then, as the very
        last rung, plain independent tiles (not exact; labelled as such), halved down to the
        minimum tile."""
        tile, mode = launch.tile or MIN_TILE, launch.mode or "exact"
        where = f"out of memory in {_label(mode)} of {tile}"
        if mode != "plain" and tile > MIN_TILE and self._tile_rung is None:
            self._tile_cap = max(MIN_TILE, tile // 2)
            return f"{where}; retrying with tiles of {self._tile_cap}"
        planned, least = launch.planned, launch.least
        if mode.startswith("exact") and planned is not None and least is not None and planned > least:
            self._tile_bytes = max(least, planned // 2)
            return f"{where}; retrying exact within {self._tile_bytes / 2**20:.0f} MiB (recomputing more)"
        if mode.startswith("exact") and self.backend.supports_tiling(self.op):
            self._tile_rung, self._tile_cap = "fast", None
            return f"{where}; retrying in fast tiles (estimated statistics)"
        if mode != "plain":
            self._tile_rung, self._tile_cap = "plain", None
            return (
                f"{where}; last resort: plain independent tiles"
                " (not exact: per-tile statistics, blended seams)"
            )
        if tile > MIN_TILE:
            self._tile_cap = max(MIN_TILE, tile // 2)
            return f"{where}; retrying with plain tiles of {self._tile_cap}"
        return None

    def _should_measure(self) -> bool:
        """Calibrate the memory model from the first untiled chunk of this shape (CUDA only)."""
        from lib_vaebatch.engine.planner import measured_bytes_per_pixel

        return (
            self.options.calibrate
            and self.backend.device.type == "cuda"
            and measured_bytes_per_pixel(self.backend, self.op, self.pixels) is None
        )

    def _peak_reset(self) -> int:
        device = self.backend.device
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return int(torch.cuda.memory_allocated(device))

    def _land(
        self, idx: list[int], pending: Pending, dtype: torch.dtype, tiled: bool, mode: str | None = None
    ) -> _Outcome:
        try:
            landed = pending.wait()
        except Exception as exc:  # noqa: BLE001 - e.g. an asynchronous CUDA error surfacing at the copy
            message = "out of memory" if is_oom(exc) else f"{type(exc).__name__}: {exc}"
            return _Outcome(idx, [None] * len(idx), [False] * len(idx), dtype, tiled, message)
        return _Outcome(idx, list(landed.samples), landed.finite, dtype, tiled, tile_mode=mode)

    # -- outcomes ------------------------------------------------------------------------------
    def _accept(self, outcome: _Outcome, *, recovered_from: list[str] | None) -> list[int]:
        """Record an outcome; returns the indices whose output was not finite."""
        bad: list[int] = []
        name = dtype_name(outcome.dtype)
        for i, sample, finite in zip(outcome.indices, outcome.samples, outcome.finite, strict=True):
            rep = self.reports[i]
            rep.dtype, rep.tiled = name, outcome.tiled
            rep.tile_mode = outcome.tile_mode if outcome.tiled else None
            if outcome.error is not None or sample is None:
                rep.status, rep.message = Status.FAILED, outcome.error or "no output"
                self._awaiting_recovery.discard(i)
            elif finite:
                if self.keep_outputs:
                    self.outputs[i] = sample
                if recovered_from:
                    rep.status = Status.RECOVERED
                    rep.message = f"non-finite in {', '.join(recovered_from)}; recovered in {name}"
                else:
                    rep.status, rep.message = Status.OK, ""
                self._awaiting_recovery.discard(i)
                if self.on_sample is not None:
                    self.on_sample(i, sample, rep)
            else:
                rep.status = Status.FAILED
                rep.message = f"non-finite output in {name} ({_non_finite_counts(sample)})"
                self._awaiting_recovery.add(i)
                bad.append(i)
        self._report_progress()
        return bad

    def _report_progress(self) -> None:
        if self.progress is not None:
            settled = sum(r.status is not Status.CANCELLED for r in self.reports) - len(
                self._awaiting_recovery
            )
            self.progress(settled, self.n, f"{self.op} {settled}/{self.n}")

    def _set_dtype(self, dtype: torch.dtype, why: str) -> None:
        if self.backend.dtype != dtype:
            self.events.append(f"{dtype_name(self.backend.dtype)} -> {dtype_name(dtype)}: {why}")
            self.backend.set_dtype(dtype)

    def _ladder_above(self, dtype: torch.dtype) -> list[torch.dtype]:
        rungs: list[torch.dtype] = []
        for rung in self.options.ladder_dtypes:
            if (
                robustness(rung) > robustness(dtype)
                and rung not in rungs
                and self.backend.supports_dtype(rung)
            ):
                rungs.append(rung)
        return rungs

    def _recover(self, bad: list[int], failed_dtype: torch.dtype) -> None:
        """Re-run only ``bad`` up the precision ladder."""
        base = self.backend.dtype
        remaining = list(bad)
        tried = [dtype_name(failed_dtype)]
        escalate_to: torch.dtype | None = None
        for rung in self._ladder_above(failed_dtype):
            if not remaining or self._is_cancelled():
                break
            self._set_dtype(rung, f"re-running {len(remaining)} non-finite sample(s) {remaining}")
            attempted: set[int] = set()
            still_bad: list[int] = []
            for outcome in self._chunks(remaining, overlapped=False):
                attempted.update(outcome.indices)
                still_bad += self._accept(outcome, recovered_from=tried)
            if any(self.reports[i].status is Status.RECOVERED for i in attempted):
                escalate_to = rung
            tried.append(dtype_name(rung))
            remaining = still_bad + [i for i in remaining if i not in attempted]
        for i in remaining:
            rep = self.reports[i]
            if self._cancelled:
                rep.message += "; recovery cancelled"
            elif len(tried) == 1:
                ladder = ",".join(self.options.ladder) or "empty"
                rep.message += f"; no more robust precision to retry in (ladder: {ladder})"
            else:
                rep.message = f"non-finite output in every precision tried ({', '.join(tried)})"
            self._awaiting_recovery.discard(i)
        self._report_progress()
        if escalate_to is not None and self.options.escalate_remaining:
            self._set_dtype(escalate_to, "the rest of the job runs in the recovered precision")
        else:
            self._set_dtype(base, "back to the job's precision after recovery")
