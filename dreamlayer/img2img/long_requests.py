"""Requests that hold one of waitress's threads for long — a synchronous generation waiting for
ComfyUI, a job's event stream — may take all but a few of them: with every thread waiting, the
service answered nothing else, not the interrupt that would free them, not /health. One more
such request is answered 503 ``busy`` at once instead (Retry-After), so the short ones always
find a thread.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

from dreamlayer.errors import ApiError

#: Threads kept for short requests (interrupt, cancel, status, images, /health).
RESERVED = 4


class Busy(ApiError):
    status = 503
    code = "busy"


class LongRequests:
    def __init__(self, threads: int):
        self.limit = max(1, threads - min(RESERVED, threads - 1))
        self._free = threading.BoundedSemaphore(self.limit)

    def take(self) -> None:
        """One of the long requests' places, or Busy."""
        if not self._free.acquire(blocking=False):
            raise Busy(f"{self.limit} requests already wait for ComfyUI or follow a job's events (IMG2IMG_THREADS "
                       f"less {RESERVED} kept for short requests): try again in a moment, send the request "
                       "with \"async\": true, or raise IMG2IMG_THREADS", retry_after=1)

    def give_back(self) -> None:
        self._free.release()

    def place(self):
        """take(), and a function that gives the place back once, however often it is called."""
        self.take()
        once = threading.Lock()

        def give_back():
            if once.acquire(blocking=False):
                self.give_back()
        return give_back

    @contextmanager
    def held(self):
        self.take()
        try:
            yield
        finally:
            self.give_back()
