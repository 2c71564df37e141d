"""call_queue (reference §6.3): queue_lock, wrap_gradio_gpu_call and its error/timing behaviour."""

from __future__ import annotations

import html
import threading
import time

queue_lock = threading.Lock()  # the webui's FIFOLock behaves as a (non-reentrant) lock here
task_log: list[str] = []  # test instrumentation: task ids seen


def wrap_queued_call(func):
    def f(*args, **kwargs):
        with queue_lock:
            return func(*args, **kwargs)

    return f


def wrap_gradio_gpu_call(func, extra_outputs=None):
    from modules import shared

    def f(*args, **kwargs):
        id_task = args[0] if args and isinstance(args[0], str) and args[0].startswith("task(") else None
        if id_task:
            task_log.append(id_task)
        with queue_lock:
            shared.state.begin(job=id_task or "")
            try:
                return func(*args, **kwargs)
            finally:
                shared.state.end()

    return wrap_gradio_call(f, extra_outputs=extra_outputs)


def wrap_gradio_call(func, extra_outputs=None):
    def f(*args, **kwargs):
        from modules import shared

        t = time.perf_counter()
        try:
            res = list(func(*args, **kwargs))
        except Exception as e:  # §6.3: exceptions become extra_outputs + an error div
            res = list(extra_outputs or [None, ""]) + [f"<div class='error'>{html.escape(str(e))}</div>"]
        shared.state.skipped = shared.state.interrupted = shared.state.stopping_generation = False
        shared.state.job_count = 0
        res[-1] += f"<div class='performance'>Time taken: {time.perf_counter() - t:.1f} sec.</div>"
        return tuple(res)

    return f
