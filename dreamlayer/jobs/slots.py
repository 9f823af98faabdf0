"""Backend slots shared by every replica: the one-in-flight-per-backend rule across processes.

A slot is a Redis lock (redis-py's Lock: SET NX with a lease, renewed while held) named after the
backend and a slot number, COMFY_PROMPTS_PER_BACKEND of them per backend. A queue worker takes a
free slot *before* it takes a job (pull-based: a backend takes the next job when it is free), so
no job waits in one replica while a backend is free for another. A replica that dies holding a
slot frees it when the lease runs out.
"""
from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from redis.exceptions import LockError

from dreamlayer.comfyui.errors import ComfyInterrupted
from dreamlayer.comfyui.pool import Backend, BackendPool, NoBackendLeft
from dreamlayer.jobs.records import PREFIX, REDIS_DOWN

log = logging.getLogger(__name__)

#: How long a backend stays marked wanted after the last poll of the job waiting for it.
WANTED_MS = 500

#: How long an idle worker with no slot waits before it looks again when this process holds every
#: slot (a release here wakes it at once; the wait only bounds a slot lost to an expired lease).
ALL_HELD_WAIT_S = 1.0

#: The slot a queue worker holds for the job it runs now (thread-local, set by worker.py), and
#: ``give_up``: how to hand it back early, once the job's last prompt has ended (Lease.release).
held = threading.local()


@dataclass(eq=False)
class Slot:
    backend: Backend
    lock: object  # redis.lock.Lock
    renewed_at: float = field(default_factory=time.monotonic)  # the last time it was known ours
    released: bool = False
    lost: bool = False  # taken by another worker after its lease ran out (renew)
    #: renew() and release() one at a time: a renewal racing a release must not take it again
    _guard: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def renew(self) -> bool:
        """Extend the lease; if it ran out (Redis was away longer than the lease), take the slot
        again when nobody else has. False: released here, or someone else holds it now."""
        with self._guard:
            if self.released:  # the keeper's list was read before the release: not ours to take
                return False
            try:
                self.lock.reacquire()
            except LockError:
                if not self.lock.acquire(blocking=False):
                    log.warning("lost the slot of %s to another worker (its lease ran out)", self.backend.url)
                    self.lost = True
                    return False
                log.info("the slot of %s had expired (Redis away?); taken again", self.backend.url)
            self.renewed_at, self.lost = time.monotonic(), False
            return True

    def surely_ours(self, lease_s: float) -> bool:
        """Renewed within half a lease (the keeper renews it five times a lease): still ours
        without asking Redis; otherwise (Redis was away) renewed now, or False when lost."""
        if self.lost:
            return False
        return time.monotonic() - self.renewed_at < lease_s / 2 or self.renew()

    def release(self) -> None:
        with self._guard:
            self.released = True
            try:
                self.lock.release()
            except LockError:
                pass  # expired already: someone else may hold it now
            except REDIS_DOWN as exc:  # its lease runs out by itself: the job's outcome stands
                log.info("the slot of %s is not released (Redis away: %s); it frees itself within a lease",
                         self.backend.url, exc)


class RedisSlots:
    def __init__(self, client, pool: BackendPool, lease_s: float, prefix: str = PREFIX):
        self.redis = client
        self.pool = pool
        self.lease_s = lease_s
        self.prefix = prefix
        self._held: set = set()
        self._lock = threading.Lock()
        self._freed = threading.Condition()
        self._changes = 0  # releases and offers so far (under _freed): a waiter misses none
        self._last_freed = None  # the backend of the last slot released here: tried first
        #: jobs of this process waiting in acquire() for a slot; a worker holding one idle gives it
        self.waiting = 0
        #: the backends each of them must not use (acquire's ``exclude``), by waiter
        self._waiters: dict = {}
        #: slots released here while a job here waited for one: still held, theirs to take (release)
        self._offers: list = []
        #: (usable: backend -> bool, idle_before) -> an idle local worker's slot, or None
        #: (QueueWorkers._lend)
        self.lend = None

    @property
    def per_backend(self):
        return self.pool.slots

    def _name(self, backend: Backend, index: int) -> str:
        return f"{self.prefix}slot:{backend.url}:{index}"

    def _wanted(self, backend: Backend) -> str:
        return f"{self.prefix}slot-wanted:{backend.url}"

    def _candidates(self, exclude) -> list:
        candidates = [b for b in self.pool.backends if b not in exclude]
        if not candidates:
            raise NoBackendLeft()
        up = [b for b in candidates if b.reachable]
        if not up:
            if len(candidates) < len(self.pool.backends):
                raise NoBackendLeft()
            up = candidates  # none answers: try them all (one that came back is used at once)
        return up

    def try_acquire(self, exclude=(), *, waiting: bool = False, unless_queued: str | None = None) -> Slot | None:
        """A free slot of a backend in rotation (the least recently used first), or None.
        Raises NoBackendLeft when ``exclude`` leaves no backend. An idle queue worker
        (``waiting`` False) leaves alone the backends a running job waits for (see acquire).
        ``unless_queued``: a queue's key; None while a job waits in it (a job started at once
        must not overtake them)."""
        up = self._candidates(exclude)
        if not waiting:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.mget([self._wanted(b) for b in up])
                if unless_queued:
                    pipe.llen(unless_queued)
                wanted, *queued = pipe.execute()
            if any(queued):
                return None
            up = [b for b, w in zip(up, wanted) if w is None]
        for backend in sorted(up, key=lambda b: (b is not self._last_freed, b.busy, b._last_used)):
            for index in range(self.per_backend):
                lock = self.redis.lock(self._name(backend, index), timeout=self.lease_s, thread_local=False)
                if lock.acquire(blocking=False):
                    slot = Slot(backend, lock)
                    with self._lock:
                        self._held.add(slot)
                    return slot
        return None

    def acquire(self, *, timeout: float, exclude=(), cancelled=None) -> Slot:
        """Wait for a free slot; TimeoutError after ``timeout``; ComfyInterrupted once
        ``cancelled()`` is true (a cancel wakes it: wake()). Used by a job that has none from
        its worker: a retry on another backend, or a job taken from the queue while every backend
        was busy (QueueWorker: taken and prepared ahead, it starts the moment a slot frees here).
        A slot released here is handed to it at once, still held (release); else an idle local
        worker's slot is borrowed, else a free one taken in Redis.
        When this process holds every slot only its own releases can free one: nothing to poll.
        Otherwise others' releases are polled, and the backends it may use are marked wanted, so
        that idle queue workers elsewhere (which take a free slot again at once after each empty
        wait for a job) leave the next free slot to this job."""
        deadline = time.monotonic() + timeout
        marked: list = []
        waiter = object()
        with self._freed:
            self.waiting += 1
            self._waiters[waiter] = frozenset(exclude)
        try:
            while True:
                with self._freed:
                    changes = self._changes
                if cancelled is not None and cancelled():  # never holds a slot for a cancelled job
                    raise ComfyInterrupted(message="The generation was interrupted")
                slot = self._take_offer(exclude) or self.borrow(exclude) or self.try_acquire(exclude, waiting=True)
                if slot is not None:
                    return slot
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no ComfyUI backend slot became free in time")
                wait = min(left, ALL_HELD_WAIT_S)
                if not self.all_held_here():
                    marked = self._candidates(exclude)
                    with self.redis.pipeline(transaction=False) as pipe:
                        for backend in marked:
                            pipe.set(self._wanted(backend), 1, px=WANTED_MS)
                        pipe.execute()
                    wait = min(wait, 0.05)
                with self._freed:  # a slot freed (or offered) here wakes it at once
                    if self._changes == changes:
                        self._freed.wait(wait)
        finally:
            with self._freed:
                self.waiting -= 1
                del self._waiters[waiter]
                unwanted = [s for s in self._offers if not self._wanted_here(s.backend)]
                for slot in unwanted:  # offered to this job alone: back to every replica
                    self._offers.remove(slot)
            for slot in unwanted:
                self._drop(slot)
            if marked:
                self.redis.delete(*[self._wanted(b) for b in marked])

    def _wanted_here(self, backend: Backend) -> bool:
        """Whether a job here waits for a slot and may use ``backend`` (under _freed)."""
        return any(backend not in exclude for exclude in self._waiters.values())

    def _take_offer(self, exclude) -> Slot | None:
        """A slot released here for the waiting jobs (release), of a backend not in ``exclude``;
        used only when surely still ours (as a lent one: see borrow)."""
        with self._freed:
            slot = next((s for s in self._offers if s.backend not in exclude), None)
            if slot is None:
                return None
            self._offers.remove(slot)
        return self._if_ours(slot)

    def _if_ours(self, slot: Slot) -> Slot | None:
        """``slot`` when surely still ours (Slot.surely_ours), else None, the slot dropped."""
        ours = False
        try:
            ours = slot.surely_ours(self.lease_s)
        finally:
            if not ours:
                self._drop(slot)
        return slot if ours else None

    def borrow(self, exclude=(), idle_before: float | None = None) -> Slot | None:
        """An idle local worker's slot (``lend``; for a job here waiting for one, or a request run
        at once), or None. Used only when surely still ours: after Redis was away longer than a
        lease it may be another replica's by now."""
        if self.lend is None:
            return None
        up = self._candidates(exclude)
        while True:
            slot = self.lend(lambda backend: backend in up, idle_before)
            if slot is None:
                return None
            if self._if_ours(slot) is not None:
                return slot

    def _drop(self, slot: Slot) -> None:
        """Forget a slot that is no longer surely ours, or that no job here wants any more
        (releasing it in Redis if it is still ours)."""
        try:
            self._give_back(slot)
        except Exception:  # noqa: BLE001 - Redis away: its lease runs out
            pass

    def wake(self) -> None:
        """Wake the jobs here waiting for a slot: an idle worker here offers one to lend, or
        one of them is cancelled."""
        with self._freed:
            self._changes += 1
            self._freed.notify_all()

    def queue_is_wanted(self, pipe, backend: Backend) -> None:
        """Queue on ``pipe`` whether a job waiting for a retry wants ``backend`` (see acquire)."""
        pipe.exists(self._wanted(backend))

    def release(self, slot: Slot) -> None:
        """Hand the slot back. When a job here waits for a slot of its backend (acquire: a job
        taken ahead, a retry), it goes to that job directly, still held: no release and new
        acquisition in Redis between two prompts on the backend (two round trips and the waiter's
        search; docs/scaling.md, "Cost"). Otherwise, to every replica."""
        with self._freed:
            if not (slot.released or slot.lost) and self._wanted_here(slot.backend):
                self._offers.append(slot)
                self._last_freed = slot.backend
                self._changes += 1
                self._freed.notify_all()
                return
        self._give_back(slot)

    def _give_back(self, slot: Slot) -> None:
        """Release the slot in Redis, for every replica."""
        with self._lock:
            self._held.discard(slot)
        slot.release()
        with self._freed:
            self._last_freed = slot.backend
            self._changes += 1
            self._freed.notify_all()

    def wait_freed(self, timeout: float) -> None:
        """Until this process frees a slot, or ``timeout`` (slots freed by other replicas are
        found by polling): a spare worker takes a slot the moment a job here ends. When this
        process holds every slot, only its own release can free one: no polling then (it cost a
        round trip per backend every poll, a sixth of the process's time under load)."""
        with self._freed:
            if self.all_held_here():
                timeout = max(timeout, ALL_HELD_WAIT_S)
            self._freed.wait(timeout)

    def all_held_here(self) -> bool:
        with self._lock:
            return len(self._held) >= len(self.pool.backends) * self.per_backend

    def renew_all(self) -> None:
        """Extend the lease of every slot this process holds (the lease keeper calls it)."""
        with self._lock:
            slots = list(self._held)
        for slot in slots:
            if not slot.renew() and not slot.released:
                with self._lock:  # lost to another replica: this process no longer holds every slot
                    self._held.discard(slot)


class SharedBackendPool(BackendPool):
    """A BackendPool whose slots are shared by every replica through Redis. A job's first lease
    is the slot its worker took before taking the job; a retry takes another one. With no slot
    limit (one backend, COMFY_PROMPTS_PER_BACKEND unset) it is the plain pool."""

    def __init__(self, backends: list, *, slots=None, probe_interval_s: float = 2.0):
        super().__init__(backends, slots=slots, probe_interval_s=probe_interval_s)
        self.shared = None  # RedisSlots, set by the worker runtime

    @contextmanager
    def lease(self, *, timeout=None, exclude=(), cancelled=None, ahead=False):
        if self.slots is None or self.shared is None:
            with super().lease(timeout=timeout, exclude=exclude, cancelled=cancelled, ahead=ahead) as lease:
                yield lease
            return
        slot = getattr(held, "slot", None)
        own = slot is None or slot.backend in exclude
        if own:
            slot = self.shared.acquire(timeout=timeout if timeout is not None else 3600, exclude=exclude,
                                       cancelled=cancelled or getattr(held, "cancelled", None))
        backend = slot.backend
        with self._cond:
            backend.busy += 1
            backend._last_used = next(self._uses)
        freed = threading.Event()

        def free_slot() -> None:
            """The lease's slot back to every replica: its own, or the one its worker took before
            the job (released by the worker, held.give_up; otherwise kept for its next job)."""
            if freed.is_set():
                return
            freed.set()
            if own:
                self.shared.release(slot)
            elif getattr(held, "give_up", None) is not None:
                held.give_up()

        try:
            with self._counted(backend, early=free_slot) as lease:
                yield lease
        finally:
            if own:
                free_slot()
