"""Background image writing (issue 5 §3): decoded samples are turned into images, encoded
(PNG/JPEG/WebP) and written by a few worker threads while the next chunk decodes.

- Bounded: at most ``max_pending`` images are queued or being written; :meth:`ImageWriter.submit`
  blocks while that many are in flight, so memory stays flat however long the batch.
- Deterministic names: each job gets its place in line when it is submitted, and the part of a
  save that picks the file name runs in that order (:meth:`WriteJob.turn`), while the conversion
  and the encoding run in parallel. File numbers follow the decode order whatever the thread timing.
- Nothing lost: a failed write (an ``OSError``: disk full, permission, ...) is recorded with the
  file it was for, and the image is kept in the result; the other writes go on. Any other
  exception in a worker is recorded too, logged with its traceback, and raised by
  :meth:`ImageWriter.close` (``strict``).
- Cancelling a decode never drops a submitted image: :meth:`ImageWriter.close` waits for them all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

if TYPE_CHECKING:
    import torch

    from lib_vaebatch.naming import SequentialNamer

log = logging.getLogger("vaebatch")


def default_workers() -> int:
    """Two writer threads (one on a single-core machine): PNG encoding releases the GIL, and
    more threads than that mostly compete with the decode for the same cores."""
    return max(1, min(2, os.cpu_count() or 1))


class _Turns:
    """Admits job ``seq`` only after every job before it has had its turn."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = 0

    def wait(self, seq: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._next == seq)

    def advance(self, seq: int) -> None:
        with self._cond:
            self._next = seq + 1
            self._cond.notify_all()


@dataclass(eq=False)
class WriteJob:
    """One image to write, as the save callable sees it.

    ``image`` is made from the decoded tensor on first use, in the worker thread. ``decoration``,
    ``infotext``, ``fmt`` and ``values`` (prompt, seed, width... for a host's own file-name
    tokens) were fixed at submit time. A save callable sets ``path`` as soon as it knows the file
    name, so that an error raised while writing names the file."""

    seq: int
    decoration: str
    infotext: str | None = None
    fmt: str = "png"
    values: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    key: Any = None
    path: Path | None = None
    _source: torch.Tensor | Image.Image | None = field(default=None, repr=False)
    _image: Image.Image | None = field(default=None, repr=False)
    _turns: _Turns | None = field(default=None, repr=False)
    _turn_taken: bool = field(default=False, repr=False)
    _in_turn: bool = field(default=False, repr=False)

    @property
    def image(self) -> Image.Image:
        if self._image is None:
            source = self._source
            if isinstance(source, Image.Image):
                self._image = source
            elif source is None:
                raise RuntimeError(f"{self.label}: no image to write")
            else:
                from lib_vaebatch.images import tensor_to_image

                self._image = tensor_to_image(source)
            self._source = None  # the tensor is not needed any more
        return self._image

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        """Run the block after every earlier job's turn and before every later one's. Put the
        choice of the file name (and the short write) here; encode before it, in parallel."""
        if self._turns is None or self._in_turn:  # nested: a saver inside in_order()
            yield
            return
        if self._turn_taken:
            raise RuntimeError("a write job takes its turn once")
        self._turn_taken = True
        self._turns.wait(self.seq)
        self._in_turn = True
        try:
            yield
        finally:
            self._in_turn = False
            self._turns.advance(self.seq)

    def _pass_turn(self) -> None:
        """Let later jobs go when this one ended without taking its turn."""
        if self._turns is not None and not self._turn_taken:
            self._turn_taken = True
            self._turns.wait(self.seq)
            self._turns.advance(self.seq)

    def _kept(self) -> tuple[Image.Image | None, torch.Tensor | None]:
        """The image for the caller, or the raw tensor when not even the image could be made."""
        try:
            return self.image, None
        except Exception:  # noqa: BLE001 - the conversion itself failed: hand back the tensor
            source = self._source
            return None, (None if isinstance(source, Image.Image) else source)


#: ``save(job)`` writes ``job.image`` and returns the file's path (or None when the host keeps
#: it to itself). Raise ``OSError`` for an expected failure (disk full, permission...).
SaveFn = Callable[[WriteJob], "Path | str | None"]


@dataclass
class WriteResult:
    """What became of one submitted image. On failure (and with ``keep_images``) ``image`` holds
    the picture, so nothing decoded is lost; ``sample`` holds the tensor if no image could be made."""

    seq: int
    key: Any
    label: str
    infotext: str | None
    path: Path | None = None
    error: str | None = None
    exception: BaseException | None = None
    image: Image.Image | None = None
    sample: torch.Tensor | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def unexpected(self) -> bool:
        """A failure that is not an I/O error, i.e. a bug in the save callable."""
        return self.exception is not None and not isinstance(self.exception, OSError)


class WriterError(RuntimeError):
    """Raised by :meth:`ImageWriter.close` for unexpected worker exceptions; carries every
    result (the written files and the kept images)."""

    def __init__(self, message: str, results: list[WriteResult]) -> None:
        super().__init__(message)
        self.results = results


def in_order(save: SaveFn) -> SaveFn:
    """Run a host's whole save call in submit order (for save functions that pick their own file
    names, e.g. the webui's ``images.save_image``, which numbers files by listing the folder and
    is not safe to call from two threads at once). Writing still overlaps the decode."""

    def ordered(job: WriteJob) -> Path | str | None:
        with job.turn():
            return save(job)

    return ordered


def folder_saver(namer: SequentialNamer, *, quality: int = 95) -> SaveFn:
    """Our own save: encode with metadata (in parallel), then take the next sequence number and
    write the bytes in turn. Writes the same bytes as :func:`lib_vaebatch.saving.save_image`."""
    from lib_vaebatch.saving import encode_image, format_for

    def save(job: WriteJob) -> Path:
        fmt = format_for(job.image, job.fmt)  # too large for JPEG/WebP: PNG, as the webui does
        data = encode_image(job.image, fmt, job.infotext, quality=quality)
        with job.turn(), namer.create(job.decoration, f".{fmt}") as (path, fh):
            job.path = path
            fh.write(data)
        return path

    return save


class ImageWriter:
    """Writes images with ``save`` on ``workers`` background threads (0: in the calling thread),
    with at most ``max_pending`` images submitted and not yet written.

    Submit from one thread (the decode loop); use as a context manager or call :meth:`close`."""

    def __init__(
        self,
        save: SaveFn,
        *,
        workers: int | None = None,
        max_pending: int | None = None,
        keep_images: bool = False,
    ) -> None:
        self.workers = default_workers() if workers is None else int(workers)
        if self.workers < 0:
            raise ValueError(f"workers must be 0 or more, not {workers!r}")
        self.max_pending = max(1, 2 * self.workers) if max_pending is None else int(max_pending)
        if self.max_pending < 1:
            raise ValueError(f"max_pending must be 1 or more, not {max_pending!r}")
        self.keep_images = keep_images
        self._save = save
        self._slots = threading.Semaphore(self.max_pending)
        self._pool = (
            ThreadPoolExecutor(self.workers, thread_name_prefix="vaebatch-writer") if self.workers else None
        )
        self._turns = _Turns()
        self._lock = threading.Lock()
        self._results: dict[int, WriteResult] = {}
        self._futures: list[Future[None]] = []
        self._seq = 0
        self._in_flight = 0
        self.peak_in_flight = 0
        self._closed = False

    @property
    def in_flight(self) -> int:
        """Images submitted and not yet written (or failed)."""
        return self._in_flight

    def submit(
        self,
        sample: torch.Tensor | Image.Image,
        decoration: str,
        *,
        infotext: str | None = None,
        fmt: str = "png",
        values: dict[str, Any] | None = None,
        label: str = "",
        key: Any = None,
    ) -> WriteJob:
        """Queue one image (a decoded ``[3, H, W]`` tensor in [-1, 1], or a PIL image); blocks
        while ``max_pending`` images are in flight. Names are decided in submit order."""
        if self._closed:
            raise RuntimeError("the image writer is closed")
        self._slots.acquire()
        try:
            with self._lock:
                job = WriteJob(
                    seq=self._seq,
                    decoration=decoration,
                    infotext=infotext,
                    fmt=fmt,
                    values=dict(values or {}),
                    label=label or f"image {self._seq}",
                    key=key,
                    _source=sample,
                    _turns=self._turns,
                )
                self._seq += 1
                self._in_flight += 1
                self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
                # Queued under the lock, so the pool (first in, first out) starts jobs in seq
                # order: a job waiting for its turn only waits for jobs already running.
                if self._pool is not None:
                    self._futures.append(self._pool.submit(self._run, job))
        except BaseException:
            self._slots.release()
            raise
        if self._pool is None:
            self._run(job)
        return job

    def _run(self, job: WriteJob) -> None:
        result = WriteResult(job.seq, job.key, job.label, job.infotext)
        try:
            saved = self._save(job)
            result.path = Path(saved) if saved is not None else job.path
        except OSError as exc:
            target = exc.filename or job.path or f"{job.decoration!r}"
            result.error = f"{job.label}: could not save {target} ({exc.strerror or exc})"
            result.exception = exc
        except Exception as exc:  # recorded, logged and raised by close(): never lost
            log.error("%s: saving the image failed", job.label, exc_info=True)
            result.error = f"{job.label}: could not save ({type(exc).__name__}: {exc})"
            result.exception = exc
        finally:
            try:
                job._pass_turn()
                if result.error is not None or self.keep_images:
                    result.image, result.sample = job._kept()
            finally:
                with self._lock:
                    self._results[job.seq] = result
                    self._in_flight -= 1
                self._slots.release()

    def close(self, *, strict: bool = True) -> list[WriteResult]:
        """Wait for every submitted image and return the results in submit order. With
        ``strict``, an unexpected worker exception is raised as :class:`WriterError` afterwards."""
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        with self._lock:
            results = [self._results[i] for i in sorted(self._results)]
        crashed = [f.exception() for f in self._futures if f.exception() is not None]
        if crashed:  # the worker's own bookkeeping failed: never let that pass silently
            raise WriterError(f"image writer failed: {crashed[0]!r}", results) from crashed[0]
        if strict and (bad := next((r for r in results if r.unexpected), None)):
            raise WriterError(bad.error or "image writer failed", results) from bad.exception
        return results

    def __enter__(self) -> ImageWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        # Always wait for the writes; do not hide the body's own exception behind ours.
        self.close(strict=exc_type is None)
