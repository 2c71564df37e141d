"""shared.state (reference §1.13)."""

from __future__ import annotations


class State:
    def __init__(self) -> None:
        self.begin()

    def begin(self, job: str = "") -> None:
        self.skipped = self.interrupted = self.stopping_generation = False
        self.job, self.job_no, self.job_count = job, 0, -1
        self.sampling_step = self.sampling_steps = 0
        self.textinfo = None
        self.job_timestamp = "20240101000000"
        self.textinfo_log: list[str] = []  # test instrumentation: every textinfo value set

    def __setattr__(self, key, value):
        if key == "textinfo" and value is not None and hasattr(self, "textinfo_log"):
            self.textinfo_log.append(value)
        object.__setattr__(self, key, value)

    def end(self) -> None:
        self.job, self.job_count = "", 0

    def interrupt(self) -> None:
        self.interrupted = True

    def skip(self) -> None:
        self.skipped = True

    def nextjob(self) -> None:
        self.job_no += 1
        self.sampling_step = 0
