"""A few long-lived threads for work a request can do beside its own.

Pillow lets go of the GIL while it decodes, so a request with a mask decodes its image on its own
thread while one of these makes the mask's files (docs/performance.md, item 24). Work is handed
over only when a thread is idle: under load every core is busy anyway, and a request must never
wait for another's side work.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

_lock = threading.Lock()
_shared = None


class SideWork:
    def __init__(self, threads: int):
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="img2img-side")
        self._idle = threading.BoundedSemaphore(threads)

    def submit(self, fn, *args) -> Future | None:
        """``fn(*args)`` on an idle thread, or None when none is idle (the caller runs it itself)."""
        if not self._idle.acquire(blocking=False):
            return None
        try:
            future = self._pool.submit(fn, *args)
        except RuntimeError:  # shut down: the interpreter is exiting
            self._idle.release()
            return None
        future.add_done_callback(lambda _: self._idle.release())
        return future


def side_work() -> SideWork:
    """The process's side threads (one per core, at most 4), made on first use: the cores are
    the process's, whichever app or service asks."""
    global _shared
    with _lock:
        if _shared is None:
            _shared = SideWork(min(4, os.cpu_count() or 1))
        return _shared
