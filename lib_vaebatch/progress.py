"""A small console progress bar (stderr; redraws in place on a terminal, sparse lines otherwise)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from lib_vaebatch.log import PREFIX


class ConsoleProgress:
    def __init__(
        self, label: str, *, stream: TextIO | None = None, enabled: bool = True, width: int = 28
    ) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self._last_line = self.start
        self._drawn = False
        self._last_done = -1

    def __call__(self, done: int, total: int, text: str = "") -> None:
        if not self.enabled or done == self._last_done:
            return
        self._last_done = done
        now = time.perf_counter()
        frac = done / total if total else 1.0
        filled = int(frac * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        elapsed = now - self.start
        rate = f"{done / elapsed:.2f}/s" if elapsed > 0 and done else ""
        if rate and done < total:
            left = int((total - done) * elapsed / done)
            rate += f" ETA {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"
        line = f"{PREFIX} {self.label} [{bar}] {done}/{total} {rate}".rstrip()
        if self.tty:
            self.stream.write("\r" + line)
            self._drawn = True
            if done >= total:
                self.close()
        elif done >= total or now - self._last_line >= 5.0:
            self.stream.write(line + "\n")
            self._last_line = now
        self.stream.flush()

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
