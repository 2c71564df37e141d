"""Whole values kept outside the compute memory, read and written one tile region at a time.

An exact tiled run keeps some values whole between steps. Where they do not fit the budget, a
"spill" segment of a schedule (:mod:`lib_vaebatch.tiling.lean`) puts the values it creates in a
:class:`SpillStore` instead:

* on CUDA, in host memory (ordinary CPU tensors; each tile's crop is copied to the device);
* on the CPU, in a temporary file (:class:`DiskValue`, pixel-major so a tile's rows are contiguous
  runs of the file, read with ``preadv`` and written with ``pwritev``: no ``mmap``, so the data
  lives in the kernel's page cache, or on disk under memory pressure, never in the process).

Compute memory is then a tile's working set plus whatever values stay resident; every value is
still computed by the same layers over the same crops, so the output stays exact. The files are
unlinked at creation (nothing is left behind, even after a crash) and closed when the run drops
the value.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass

import torch

#: Environment variable naming the directory for spill files (default: the system temp directory).
SPILL_DIR_ENV = "VAEBATCH_SPILL_DIR"
#: Share of the free space of the spill directory (or of free host memory) a run may plan to use.
SPILL_SHARE = 0.5
#: Rows are copied into and out of a spill file in bands of about this many bytes.
BAND_BYTES = 8 << 20


class SpillError(RuntimeError):
    """The spill store could not be written or read (a full disk, a file size limit, an I/O
    error): the engine then runs the sample again without spilling."""


def _failed(directory: str | None, problem: OSError | str) -> SpillError:
    why = problem if isinstance(problem, str) else problem.strerror or str(problem)
    return SpillError(f"spill file in {directory or tempfile.gettempdir()}: {why}")


def _span(key: slice, length: int) -> tuple[int, int, int]:
    if not isinstance(key, slice):
        raise TypeError("a spilled value is read and written by slices only")
    start, stop, step = key.indices(length)
    if step < 1:
        raise ValueError("a spilled value is read with positive steps only")
    return start, max(start, stop), step


class DiskValue:
    """A ``[B, C, H, W]`` tensor stored in an unlinked temporary file as ``[H, W, B, C]``.

    ``value[:, :, ys, xs]`` reads a region (a ``[B, C, h, w]`` tensor, channels-last in memory
    for one sample); ``value[:, :, ys, xs] = t`` writes one. Regions never written read as zeros.
    """

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, directory: str | None = None) -> None:
        if len(shape) != 4:
            raise ValueError(f"a spilled value is [B, C, H, W], not {tuple(shape)}")
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.device = torch.device("cpu")
        b, c, h, w = self.shape
        self._pixel = b * c * torch.empty((), dtype=dtype).element_size()
        self._row = w * self._pixel
        self._directory = directory
        try:
            self._file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 (closed by close/finalize)
        except OSError as exc:
            raise _failed(directory, exc) from exc
        self._closer = weakref.finalize(self, self._file.close)
        self._fd = self._file.fileno()
        try:
            os.ftruncate(self._fd, h * self._row)
        except OSError as exc:
            self.close()
            raise _failed(directory, exc) from exc

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[2] * self._row

    def numel(self) -> int:
        return self.shape.numel()

    def is_contiguous(self) -> bool:  # never aliased by the executors
        return False

    def close(self) -> None:
        self._closer()

    def _region(self, key: tuple[slice, ...]) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        if not isinstance(key, tuple) or len(key) != 4:
            raise TypeError("index a spilled value as [:, :, rows, cols]")
        b, c, h, w = self.shape
        for k, n in zip(key[:2], (b, c), strict=True):
            if _span(k, n) != (0, n, 1):
                raise ValueError("a spilled value is read whole along batch and channels")
        return _span(key[2], h), _span(key[3], w)

    def __getitem__(self, key: tuple[slice, ...]) -> torch.Tensor:
        (y0, y1, sy), (x0, x1, sx) = self._region(key)
        b, c = self.shape[0], self.shape[1]
        rows = range(y0, y1, sy)
        width = x1 - x0
        buf = torch.empty((len(rows), width, b, c), dtype=self.dtype)
        if len(rows) and width:
            raw = buf.view(-1).view(torch.uint8).numpy().reshape(len(rows), width * self._pixel)
            if sy == 1 and width == self.shape[3]:
                self._read(raw.reshape(-1), y0 * self._row)
            else:
                for r, y in enumerate(rows):
                    self._read(raw[r], y * self._row + x0 * self._pixel)
        out = buf.permute(2, 3, 0, 1)
        return out[:, :, :, ::sx] if sx != 1 else out

    def __setitem__(self, key: tuple[slice, ...], value: torch.Tensor) -> None:
        (y0, y1, sy), (x0, x1, sx) = self._region(key)
        if sy != 1 or sx != 1:
            raise ValueError("a spilled value is written without steps")
        expect = (self.shape[0], self.shape[1], y1 - y0, x1 - x0)
        if tuple(value.shape) != expect:
            raise ValueError(f"writing {tuple(value.shape)} into a region of {expect}")
        t = value.detach().to(device="cpu", dtype=self.dtype).permute(2, 3, 0, 1).contiguous()
        raw = t.view(-1).view(torch.uint8).numpy().reshape(y1 - y0, (x1 - x0) * self._pixel)
        if x1 - x0 == self.shape[3]:
            self._write(raw.reshape(-1), y0 * self._row)
            return
        for r in range(y1 - y0):
            self._write(raw[r], (y0 + r) * self._row + x0 * self._pixel)

    def _read(self, buf: memoryview, offset: int) -> None:
        want = len(buf)
        try:
            got = os.preadv(self._fd, [buf], offset)
            while got < want:  # regular files return short reads only at the end
                more = os.preadv(self._fd, [memoryview(buf)[got:]], offset + got)
                if more <= 0:
                    raise _failed(self._directory, f"ended at byte {offset + got}")
                got += more
        except OSError as exc:
            raise _failed(self._directory, exc) from exc

    def _write(self, buf: memoryview, offset: int) -> None:
        view = memoryview(buf)
        done = 0
        try:
            while done < len(view):
                done += os.pwritev(self._fd, [view[done:]], offset + done)
        except OSError as exc:  # ENOSPC, EFBIG (a file size limit), EIO
            raise _failed(self._directory, exc) from exc

    def load(self) -> torch.Tensor:
        """The whole value as an ordinary (contiguous) tensor."""
        return self[:, :, :, :].contiguous()


@dataclass(frozen=True)
class SpillStore:
    """Where spilled values go: ``"host"`` (CPU tensors, for a CUDA run) or ``"disk"`` (files in
    ``directory``), and how many bytes a run may put there."""

    kind: str
    limit: int
    directory: str | None = None

    def new(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | DiskValue:
        if self.kind == "host":
            return torch.empty(shape, dtype=dtype, device="cpu")
        return DiskValue(shape, dtype, self.directory)

    def put(self, t: torch.Tensor) -> torch.Tensor | DiskValue:
        """A copy of ``t`` in the store, written in bands of rows (about :data:`BAND_BYTES`
        each), so the copy costs little memory on top of ``t``."""
        if self.kind == "host":
            return t.to("cpu")
        b, c, h, w = t.shape
        v = DiskValue(tuple(t.shape), t.dtype, self.directory)
        rows = max(1, BAND_BYTES // max(1, b * c * w * t.element_size()))
        for y in range(0, h, rows):
            v[:, :, y : y + rows, :] = t[:, :, y : y + rows, :]
        return v


def spill_dir() -> str:
    return os.environ.get(SPILL_DIR_ENV) or tempfile.gettempdir()


def default_store(device: torch.device, host_free: int | None = None) -> SpillStore | None:
    """The spill store for a run on ``device``: host memory for CUDA (``host_free`` bytes free),
    a temporary file for the CPU (within :data:`SPILL_SHARE` of the directory's free space)."""
    if device.type == "cuda":
        if host_free is None:
            return None
        return SpillStore("host", int(host_free * SPILL_SHARE))
    if device.type != "cpu":
        return None
    directory = spill_dir()
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return None
    return SpillStore("disk", int(free * SPILL_SHARE), directory)


def resident(value: torch.Tensor | DiskValue) -> torch.Tensor:
    """``value`` as a tensor in memory (a spilled one is read whole)."""
    return value.load() if isinstance(value, DiskValue) else value
