"""modules_forge/main_thread.py (reference §3): one worker thread runs queued tasks; other threads
wait for their task's result. Exceptions are printed and swallowed, the result is then None."""

from __future__ import annotations

import threading
import time
import traceback

lock = threading.Lock()
waiting: list = []
finished: dict = {}
last_id = 0
thread: threading.Thread | None = None
ran_on: list[str] = []  # test instrumentation: names of the threads tasks ran on


class Task:
    def __init__(self, task_id, func, args, kwargs):
        self.task_id, self.func, self.args, self.kwargs = task_id, func, args, kwargs
        self.result = None

    def work(self):
        ran_on.append(threading.current_thread().name)
        try:
            self.result = self.func(*self.args, **self.kwargs)
        except Exception:
            traceback.print_exc()


_stop = threading.Event()


def loop():
    while not _stop.is_set():
        time.sleep(0.001)
        with lock:
            task = waiting.pop(0) if waiting else None
        if task is None:
            continue
        task.work()
        with lock:
            finished[task.task_id] = task


def stop():
    _stop.set()


def start():
    global thread
    thread = threading.Thread(target=loop, name="forge-main-thread", daemon=True)
    thread.start()


def async_run(func, *args, **kwargs):
    global last_id
    with lock:
        last_id += 1
        waiting.append(Task(last_id, func, args, kwargs))
        return last_id


def run_and_wait_result(func, *args, **kwargs):
    task_id = async_run(func, *args, **kwargs)
    while True:
        time.sleep(0.001)
        with lock:
            task = finished.pop(task_id, None)
        if task is not None:
            return task.result
