"""Memory layouts for CPU decodes and encodes, chosen by measurement (issue 13).

On the CPU, the same VAE can run markedly faster with its activations and convolution weights in
``channels_last`` (oneDNN's native layout) than in the default contiguous layout; how much, or
whether at all, depends on the processor and its kernels. So nothing is decided from a table of CPU
names: the first calls of each ``(module, op, input shape, dtype, device)`` alternate between the
candidate layouts (A B B A), each call is timed, and the layout with the lowest time is kept for
every later call in this process. The probe runs on the job's own samples, so it costs no extra
decode; a candidate other than the preferred one must win by ``margin`` to be kept.

The preferred layout, kept on a tie, is channels-last, for the outputs' sake: a channels-last call
under inference mode runs the very kernels of a plain channels-last decode (``module.to(
memory_format=torch.channels_last)``, input channels_last, ``torch.inference_mode``) and gives its
outputs bit for bit, while the contiguous kernels sum in another order and differ from it by about
1.5e-5 in fp32 on an SD-size VAE (issue 13 asks for 1e-5). Contiguous is kept only where it is
measurably faster (by more than ``margin``); its outputs then differ from the plain channels-last
decode by that rounding, as A1111's loop's do.
A call of several samples is also timed one sample at a time in each layout: at small sizes one
sample's activations stay in the CPU's caches where a batch's do not, and the loop is faster per
image than the batched call (issue 13: 256², batch 4, on an Intel Xeon), while at 512² the batched
call is. Batched and per-sample calls round differently (~3e-5 in fp32 on an SD-size VAE), so the
engine's outputs equal, bit for bit, the plain decode that runs the kernels it chose (the whole
batch or one sample at a time, contiguous or channels-last); bench/bench_decode.py reports that
difference and the one from the plain channels-last decode of the whole batch.
Only decodes are probed: "auto" encodes run as the module is, so latents files stay bit-for-bit
reproducible (``channels-last`` can still be asked for).

A job switches layouts through :class:`LayoutScope`: channels-last copies of the op's 4-D weights
are put in place of the originals for the job and the very same original tensors are put back when
it ends (``close`` in a ``finally``). The copies are kept between jobs (so a job does not pay the
conversion, about as much as a 256² decode's first layer stack) for as long as their source is
unchanged: same storage, same version counter, same sampled values.

Calls in the channels-last layout run under ``torch.inference_mode``; their outputs are cloned,
outside it, into ordinary contiguous tensors, so no inference tensor reaches the caller (the webui
may later modify outputs in place) and no weight is ever created inside inference mode.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import torch

log = logging.getLogger("vaebatch")

LayoutChoice = Literal["auto", "contiguous", "channels-last"]
Clock = Callable[[], float]
T = TypeVar("T")


@dataclass(frozen=True)
class Layout:
    """How one call runs: activations and weights in channels_last, the grad mode, and whether a
    batch runs as one call or one sample at a time (``per_sample``)."""

    name: str
    channels_last: bool
    inference_mode: bool
    per_sample: bool = False

    def one_at_a_time(self) -> Layout:
        """The same layout, running a batch one sample at a time."""
        if self.per_sample:
            return self
        return Layout(f"{self.name} per sample", self.channels_last, self.inference_mode, per_sample=True)


#: The module as it is: what A1111's loop does (contiguous, ``no_grad``).
CONTIGUOUS = Layout("contiguous", channels_last=False, inference_mode=False)
#: What a tuned plain diffusers decode does: channels_last weights and input, ``inference_mode``.
CHANNELS_LAST = Layout("channels-last", channels_last=True, inference_mode=True)
CPU_CANDIDATES: tuple[Layout, ...] = (CONTIGUOUS, CHANNELS_LAST)
#: The layouts a user can fix (``cpu_layout``); the probe adds their per-sample forms for batches.
LAYOUTS = {layout.name: layout for layout in CPU_CANDIDATES}

#: (op, input shape, dtype, device)
Key = tuple[str, tuple[int, ...], torch.dtype, torch.device]


@dataclass
class _Probe:
    candidates: tuple[Layout, ...]
    schedule: list[Layout]
    times: dict[Layout, list[float]] = field(default_factory=dict)
    choice: Layout | None = None
    rounds: int = 0


class LayoutTuner:
    """Per module and :data:`Key`: which layout to run next, and what the probe decided.

    ``prefer`` (default: channels-last where it is a candidate, else ``candidates[0]``) is kept
    unless another is faster by more than ``margin``; ``rounds`` timed calls per candidate decide,
    by the fastest call of each (the minimum is robust to the first call's set-up costs and to a
    busy machine's slow spells). While the two fastest
    are within ``settle`` of each other, more rounds are timed, up to ``max_rounds``, of the
    candidates within ``settle`` of the fastest only: on a noisy machine a close call is where one
    slow spell flips the answer, and there the extra calls in the slower layout cost little by
    definition, while a clearly slower form is not run again. ``clock`` is injectable for tests.

    With ``per_sample`` (the default), a key whose batch has more than one sample also times each
    candidate run one sample at a time: on a CPU whose caches hold one small sample's activations
    but not a batch's, that is faster per image (issue 13: 256², batch 4), while at larger sizes the
    batched call wins. Which one, is measured, like the layout.
    """

    def __init__(
        self,
        candidates: Iterable[Layout] = CPU_CANDIDATES,
        *,
        rounds: int = 2,
        margin: float = 0.02,
        settle: float = 0.10,
        max_rounds: int = 6,
        prefer: Layout | None = None,
        per_sample: bool = True,
        clock: Clock = time.perf_counter,
    ) -> None:
        self.candidates = tuple(candidates)
        if not self.candidates:
            raise ValueError("a layout tuner needs at least one candidate")
        if prefer is None:
            prefer = CHANNELS_LAST if CHANNELS_LAST in self.candidates else self.candidates[0]
        if prefer not in self.candidates:
            raise ValueError(f"the preferred layout {prefer.name} is not a candidate")
        self.prefer = prefer
        self.rounds = max(1, int(rounds))
        self.margin = float(margin)
        self.settle = float(settle)
        self.max_rounds = max(self.rounds, int(max_rounds))
        self.per_sample = bool(per_sample)
        self.clock = clock
        self._probes: weakref.WeakKeyDictionary[torch.nn.Module, dict[Key, _Probe]] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    def candidates_for(self, key: Key) -> tuple[Layout, ...]:
        """The candidates a key is timed in: the per-sample forms join for a batch of several."""
        batch = key[1][0] if key[1] else 1
        if not self.per_sample or batch <= 1:
            return self.candidates
        return (*self.candidates, *(c.one_at_a_time() for c in self.candidates if not c.per_sample))

    @staticmethod
    def _round(candidates: tuple[Layout, ...], r: int) -> list[Layout]:
        # Non-default candidates first (a one-sample job then already runs the likely gain), then
        # back and forth: A B B A for two candidates.
        order = [*candidates[1:], candidates[0]]
        return order if r % 2 == 0 else order[::-1]

    def _probe(self, module: torch.nn.Module, key: Key) -> _Probe:
        per = self._probes.setdefault(module, {})
        if key not in per:
            candidates = self.candidates_for(key)
            if len(candidates) == 1:
                per[key] = _Probe(candidates, [], choice=candidates[0])
            else:
                schedule = [c for r in range(self.rounds) for c in self._round(candidates, r)]
                per[key] = _Probe(candidates, schedule, rounds=self.rounds)
        return per[key]

    def next_layout(self, module: torch.nn.Module, key: Key) -> Layout:
        """The layout the next call of ``key`` runs in (decided, or the next one to time)."""
        with self._lock:
            probe = self._probe(module, key)
            if probe.choice is not None:
                return probe.choice
            return probe.schedule[0]

    def record(self, module: torch.nn.Module, key: Key, layout: Layout, seconds: float) -> None:
        """One timed call; decides once every scheduled call has been timed."""
        with self._lock:
            probe = self._probe(module, key)
            if probe.choice is not None or not probe.schedule or probe.schedule[0] != layout:
                return
            probe.schedule.pop(0)
            probe.times.setdefault(layout, []).append(float(seconds))
            if probe.schedule:
                return
            candidates = probe.candidates
            best = {c: min(probe.times[c]) for c in candidates}
            ranked = sorted(candidates, key=lambda c: best[c])
            close = best[ranked[0]] > (1.0 - self.settle) * best[ranked[1]]
            if close and probe.rounds < self.max_rounds:
                # Only the forms still in the running (within ``settle`` of the fastest) are timed
                # again: at 512², batch 4, a call of a clearly slower form costs a minute.
                running = tuple(c for c in candidates if best[ranked[0]] > (1.0 - self.settle) * best[c])
                probe.schedule += self._round(running, probe.rounds)
                probe.rounds += 1
                return
            # A tie (within the margin of the fastest): the preferred layout, whose outputs match
            # the plain decode, then its per-sample form, then the rest in ranked order.
            order = [self.prefer, self.prefer.one_at_a_time(), *ranked]
            fastest = next(c for c in order if c in best and best[ranked[0]] >= (1.0 - self.margin) * best[c])
            probe.choice = fastest
        shape = "x".join(str(s) for s in key[1])
        timing = ", ".join(f"{c.name} {best[c]:.3f} s" for c in candidates)
        log.info("%s %s on %s: %s layout (fastest call: %s)", key[0], shape, key[3], fastest.name, timing)

    def decision(self, module: torch.nn.Module, key: Key) -> Layout | None:
        """What the probe decided for ``key`` (None while it is still timing)."""
        with self._lock:
            per = self._probes.get(module, {})
            return per[key].choice if key in per else None

    def wants_channels_last(self, module: torch.nn.Module, op: str) -> bool:
        """Whether any key of ``op`` may still run channels-last (then its weight copies are kept)."""
        with self._lock:
            for key, probe in self._probes.get(module, {}).items():
                if key[0] != op:
                    continue
                pending = probe.choice is None and any(c.channels_last for c in probe.schedule)
                if pending or (probe.choice is not None and probe.choice.channels_last):
                    return True
            return False

    def forget(self, module: torch.nn.Module | None = None) -> None:
        """Drop the decisions (of one module, or all): the next calls probe again."""
        with self._lock:
            if module is None:
                self._probes.clear()
            else:
                self._probes.pop(module, None)


#: ``VAEBATCH_CPU_LAYOUT=contiguous`` (or ``channels-last``) fixes the layout of every "auto" job in
#: the process: no probe, so repeated runs are bit-for-bit reproducible (the test suite sets it).
LAYOUT_ENV = "VAEBATCH_CPU_LAYOUT"


def default_candidates() -> tuple[Layout, ...]:
    fixed = os.environ.get(LAYOUT_ENV, "").strip().lower()
    if fixed in LAYOUTS:
        return (LAYOUTS[fixed],)
    return CPU_CANDIDATES


#: The process-wide tuner the backends use by default.
TUNER = LayoutTuner(default_candidates())


# -- channels-last weight copies ------------------------------------------------------------------
_FINGERPRINT = 16


def _fingerprint(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // _FINGERPRINT)
    return flat[::step][:_FINGERPRINT].clone()


@dataclass
class _Copy:
    param: weakref.ref[torch.nn.Parameter]
    ptr: int
    version: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    sample: torch.Tensor
    tensor: torch.Tensor

    def matches(self, p: torch.Tensor) -> bool:
        return (
            self.param() is p
            and p.data_ptr() == self.ptr
            and p._version == self.version
            and tuple(p.shape) == self.shape
            and p.dtype == self.dtype
            and p.device == self.device
            and torch.equal(_fingerprint(p), self.sample)
        )


#: module -> op -> parameter name -> its channels-last copy (dropped with the module). Keyed by
#: name: tensors cannot be keys of a WeakKeyDictionary (their == is element-wise).
_COPIES: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, dict[str, _Copy]]] = weakref.WeakKeyDictionary()
_ACTIVE: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
_ACTIVE_LOCK = threading.Lock()


def _needs_copy(p: torch.Tensor) -> bool:
    return (
        p.dim() == 4
        and p.is_floating_point()
        and not p.is_contiguous(memory_format=torch.channels_last)  # 1x1 kernels already are
    )


def drop_weight_copies(module: torch.nn.Module) -> None:
    """Free the channels-last weight copies kept for ``module``."""
    _COPIES.pop(module, None)


def _to_plain(x: T) -> T:
    """Inference or channels-last outputs as ordinary contiguous tensors (cloned outside inference
    mode); tuples and lists element-wise."""
    if isinstance(x, torch.Tensor):
        return x.clone(memory_format=torch.contiguous_format)  # type: ignore[return-value]
    if isinstance(x, (tuple, list)):
        return type(x)(_to_plain(v) for v in x)  # type: ignore[return-value]
    return x


def _cat(outs: list[T]) -> T:
    """One batch from per-sample outputs (tensors, or tuples and lists of them element-wise)."""
    first = outs[0]
    if first is None:
        return first
    if isinstance(first, torch.Tensor):
        return torch.cat(outs)  # type: ignore[return-value, arg-type]
    if isinstance(first, (tuple, list)):
        return type(first)(_cat([o[i] for o in outs]) for i in range(len(first)))  # type: ignore[return-value, index]
    raise TypeError(f"cannot join per-sample outputs of type {type(first).__name__}")


class LayoutScope:
    """One job's use of the layouts of ``module``. ``parts[op]`` are the submodules whose weights
    the op uses. Outside every call the module holds its original weights again after
    :meth:`close` (or :meth:`use_original_weights`)."""

    def __init__(
        self,
        module: torch.nn.Module,
        parts: dict[str, list[torch.nn.Module]],
        *,
        tuner: LayoutTuner | None = None,
        choice: LayoutChoice = "auto",
        probe_ops: tuple[str, ...] = ("decode",),
    ) -> None:
        if choice != "auto" and choice not in LAYOUTS:
            raise ValueError(f"layout must be auto, contiguous or channels-last, not {choice!r}")
        self.module = module
        self.parts = parts
        self.tuner = tuner or TUNER
        self.choice = choice
        self.probe_ops = probe_ops
        # id(parameter) -> (the parameter, its original tensor, the copy put in its place)
        self._swapped: dict[int, tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]] = {}
        self._used_ops: set[str] = set()
        with _ACTIVE_LOCK:
            # A module already in a job (another thread, or nested) keeps its weights as they are.
            self.enabled = module not in _ACTIVE
            if self.enabled:
                _ACTIVE.add(module)

    # -- calls ---------------------------------------------------------------------------------
    def run(self, op: str, x: torch.Tensor, fn: Callable[[torch.Tensor], T]) -> T:
        """``fn(x)`` in the layout chosen (or being timed) for this op and input."""
        if not self.enabled:
            return fn(x)
        key: Key = (op, tuple(x.shape), x.dtype, x.device)
        probing = self.choice == "auto" and op in self.probe_ops
        if probing:
            layout = self.tuner.next_layout(self.module, key)
        elif self.choice == "auto":
            layout = CONTIGUOUS
        else:
            layout = LAYOUTS[self.choice]
        self._used_ops.add(op)
        if layout.channels_last:
            self._swap_in(op)  # not timed: the copies are made once and kept
        else:
            self.use_original_weights()
        clock = self.tuner.clock
        start = clock()
        out = self._call(layout, x, fn)
        if probing:
            self.tuner.record(self.module, key, layout, clock() - start)
        return out

    @classmethod
    def _call(cls, layout: Layout, x: torch.Tensor, fn: Callable[[torch.Tensor], T]) -> T:
        if layout.per_sample and x.dim() == 4 and x.shape[0] > 1:
            return _cat([cls._call(layout, x[i : i + 1], fn) for i in range(x.shape[0])])
        if not layout.channels_last and not layout.inference_mode:
            return fn(x)
        mode = torch.inference_mode() if layout.inference_mode else contextlib.nullcontext()
        with mode:
            if layout.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            out = fn(x)
        return _to_plain(out)

    # -- weights -------------------------------------------------------------------------------
    def _params(self, op: str) -> list[tuple[str, torch.nn.Parameter]]:
        seen: dict[int, tuple[str, torch.nn.Parameter]] = {}
        for i, part in enumerate(self.parts.get(op, ())):
            for name, p in part.named_parameters():
                seen.setdefault(id(p), (f"{i}.{name}", p))
        return list(seen.values())

    def _swap_in(self, op: str) -> None:
        copies = _COPIES.setdefault(self.module, {}).setdefault(op, {})
        for name, p in self._params(op):
            if id(p) in self._swapped or not _needs_copy(p):
                continue
            entry = copies.get(name)
            if entry is None or not entry.matches(p):
                with torch.inference_mode(False), torch.no_grad():
                    original = p.data
                    entry = _Copy(
                        weakref.ref(p),
                        original.data_ptr(),
                        p._version,
                        tuple(p.shape),
                        p.dtype,
                        p.device,
                        _fingerprint(original),
                        original.contiguous(memory_format=torch.channels_last),
                    )
                copies[name] = entry
            original = p.data
            p.data = entry.tensor
            self._swapped[id(p)] = (p, original, entry.tensor)

    def use_original_weights(self) -> None:
        """Put the original weights back (before tiles, and at the end of the job)."""
        for p, original, copy in self._swapped.values():
            if p.data_ptr() == copy.data_ptr():
                p.data = original
            else:
                # Replaced during the job (e.g. a precision change cast it): keep the new values
                # and dtype, in the original's memory format.
                fmt = (
                    torch.channels_last
                    if original.is_contiguous(memory_format=torch.channels_last)
                    and not original.is_contiguous()
                    else torch.contiguous_format
                )
                with torch.no_grad():
                    p.data = p.data.contiguous(memory_format=fmt)
        self._swapped.clear()

    def close(self) -> None:
        """End of the job: original weights back; copies dropped where no key wants them."""
        if not self.enabled:
            return
        try:
            self.use_original_weights()
            per = _COPIES.get(self.module)
            if per is not None:
                for op in list(per):
                    if self.choice == "auto" and not self.tuner.wants_channels_last(self.module, op):
                        del per[op]
        finally:
            with _ACTIVE_LOCK:
                _ACTIVE.discard(self.module)
