"""Several ComfyUI backends behind one service: each run leases one, pull-based.

Why pull-based: a request waits in one first-come-first-served line and takes whichever backend
frees up first, so no backend sits idle while work waits, and a slow backend never has a queue of
its own. ``slots`` caps how many of this service's prompts one backend holds at a time (queued or
running, default 1 with several backends); with a single backend and no cap the pool is a
pass-through and ComfyUI's own queue orders the prompts, as before.

A backend that fails with ComfyUnreachable is taken out of rotation at once; a prober thread asks
every backend every ``probe_interval_s`` and puts it back when it answers (and takes out one that
stopped answering while idle).
"""
from __future__ import annotations

import itertools
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from dreamlayer.comfyui.errors import ComfyInterrupted

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Backend:
    """One ComfyUI server and what this service knows of it."""
    url: str
    client: object  # ComfyClient
    #: ComfyUI's input / output folder when this machine shares them (else HTTP upload and /view).
    input_dir: Optional[Path] = None
    output_dir: Optional[Path] = None
    reachable: bool = True
    busy: int = 0
    done: int = 0
    failed: int = 0
    _last_used: int = field(default=0, repr=False)

    def to_dict(self) -> dict:
        return {"url": self.url, "reachable": self.reachable, "busy": self.busy, "jobs_done": self.done,
                "jobs_failed": self.failed, "shared_disk": self.input_dir is not None}


class Lease:
    """A backend held for one job. ``release()`` frees it as soon as the job's last prompt has
    ended: what is left (reading and serving its outputs, recording its end) needs no room on the
    backend, so the next job starts there meanwhile. The lease's block frees it otherwise."""

    def __init__(self, backend: Backend, count, early=None):
        self.backend = backend
        self._count = count  # count(ok): the backend's busy / done / failed bookkeeping
        self._early = early  # what else an early release frees (a shared slot), or None
        self._lock = threading.Lock()
        self._ended = False

    def release(self) -> None:
        if self._end(True) and self._early is not None:
            self._early()

    def _end(self, ok: bool) -> bool:
        """Count the job on the backend once; False if it was counted already."""
        with self._lock:
            if self._ended:
                return False
            self._ended = True
        self._count(ok)
        return True


class NoBackendLeft(Exception):
    """Every backend was tried (or is out of rotation) for this run."""


class BackendPool:
    def __init__(self, backends: list, *, slots: Optional[int] = None, probe_interval_s: float = 2.0):
        if not backends:
            raise ValueError("a pool needs at least one backend")
        self.backends = list(backends)
        self.slots = slots
        self.probe_interval_s = probe_interval_s
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)  # the lock of the counters and the line
        self._tickets = itertools.count()
        self._line: list = []  # tickets of waiting leases, oldest first
        # ticket -> its lease's condition: only the first in line can go, so a change wakes only
        # it (one shared condition woke every waiting request at every change)
        self._waiting: dict = {}
        self._uses = itertools.count(1)
        self._stop = threading.Event()
        self._prober: Optional[threading.Thread] = None

    @property
    def primary(self) -> Backend:
        """The first backend: its object_info answers what models and nodes exist (all backends
        of one deployment are expected to hold the same models)."""
        return self.backends[0]

    def __len__(self) -> int:
        return len(self.backends)

    def start(self) -> "BackendPool":
        """Start the prober (only with several backends: one backend is always tried)."""
        if len(self.backends) > 1 and self._prober is None:
            self._prober = threading.Thread(target=self._probe_loop, name="comfyui-backend-prober", daemon=True)
            self._prober.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self.wake()

    def wake(self) -> None:
        """Wake every lease waiting in line: the pool closed, or one of them was cancelled."""
        with self._cond:
            for waiting in self._waiting.values():
                waiting.notify()

    def _wake_first(self) -> None:
        """Tell the first lease in line that something changed (the lock held)."""
        if self._line:
            self._waiting[self._line[0]].notify()

    # -- leasing ------------------------------------------------------------------------------
    def _free(self, backend: Backend) -> bool:
        return self.slots is None or backend.busy < self.slots

    def _pick(self, exclude) -> Optional[Backend]:
        candidates = [b for b in self.backends if b not in exclude]
        if not candidates:
            raise NoBackendLeft()
        up = [b for b in candidates if b.reachable]
        if not up:
            if len(candidates) < len(self.backends):  # a retry: only reachable ones count
                raise NoBackendLeft()
            # nothing answers: try the one out of rotation longest (it fails fast if still down,
            # and a backend that came back is used at once)
            up = [min(candidates, key=lambda b: b._last_used)]
        free = [b for b in up if self._free(b)]
        if not free:
            return None
        return min(free, key=lambda b: (b.busy, b._last_used))  # the least busy, then least recent

    @contextmanager
    def lease(self, *, timeout: Optional[float] = None, exclude=(), cancelled: Optional[Callable] = None,
              ahead: bool = False):
        """A Lease of the backend to run on, held until the block ends (or its release()). Waits
        (first come, first served) while every backend is busy; raises NoBackendLeft when
        ``exclude`` leaves none, TimeoutError after ``timeout`` seconds of waiting, and
        ComfyInterrupted once ``cancelled()`` is true (a cancel wakes the line: wake()).
        ``ahead``: a run retried after its backend was lost waited its turn already: it goes
        first, not to the back of the line."""
        ticket = next(self._tickets)
        with self._cond:
            waiting = self._waiting[ticket] = threading.Condition(self._lock)
            self._line.insert(0, ticket) if ahead else self._line.append(ticket)
            try:
                stop = (lambda: self._stop.is_set()) if cancelled is None else (
                    lambda: self._stop.is_set() or cancelled())
                ok = waiting.wait_for(lambda: self._line[0] == ticket and self._pick(exclude) is not None
                                      or stop(), timeout)
                if cancelled is not None and cancelled():
                    raise ComfyInterrupted(message="The generation was cancelled while it waited for a "
                                                   "ComfyUI backend")
                if not ok or self._stop.is_set():
                    raise TimeoutError("no ComfyUI backend became free in time")
                backend = self._pick(exclude)
                backend.busy += 1
                backend._last_used = next(self._uses)
            finally:
                self._line.remove(ticket)
                del self._waiting[ticket]
                self._wake_first()  # the next in line may go now (another backend free)
        with self._counted(backend) as lease:
            yield lease

    @contextmanager
    def _counted(self, backend: Backend, early=None):
        """A Lease of ``backend`` (already counted busy): done or failed when the block ends or
        the lease is released, and the waiting leases told that it is free."""
        def count(ok: bool) -> None:
            with self._cond:
                backend.busy -= 1
                if ok:
                    backend.done += 1
                else:
                    backend.failed += 1
                self._wake_first()

        lease = Lease(backend, count, early)
        ok = False
        try:
            yield lease
            ok = True
        finally:
            lease._end(ok)

    # -- health -------------------------------------------------------------------------------
    def mark_down(self, backend: Backend, reason: str = "") -> None:
        with self._cond:
            if backend.reachable and len(self.backends) > 1:
                log.warning("ComfyUI backend %s taken out of rotation: %s", backend.url, reason or "unreachable")
            backend.reachable = False
            self._wake_first()

    def mark_up(self, backend: Backend) -> None:
        with self._cond:
            if not backend.reachable:
                log.info("ComfyUI backend %s answers again: back in rotation", backend.url)
            backend.reachable = True
            self._wake_first()

    def probe(self) -> None:
        """Ask every backend whether it answers, once, all at the same time: a hung one (its
        health check waits for a timeout) must not delay what is known of the others."""
        def ask(backend: Backend) -> None:
            if backend.client.is_up():
                self.mark_up(backend)
            elif backend.busy == 0 or not backend.reachable:
                self.mark_down(backend, "does not answer")
        if len(self.backends) == 1:
            ask(self.backends[0])
            return
        with ThreadPoolExecutor(len(self.backends), thread_name_prefix="comfyui-probe") as asking:
            list(asking.map(ask, self.backends))

    def _probe_loop(self) -> None:
        while not self._stop.wait(self.probe_interval_s):
            try:
                self.probe()
            except Exception:  # pragma: no cover - a prober must never die
                log.exception("backend probe failed")

    def health(self) -> list:
        with self._cond:
            return [b.to_dict() for b in self.backends]
