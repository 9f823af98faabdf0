"""Queue workers: the threads of a replica that run jobs from the Redis queue (REDIS_URL), their
lease keeper, their control listener, and synchronous requests run at once (run_here).

The workers themselves are RQ workers (rq_worker.py); a job's run writes its state through to the
job's record (mirrored.py).
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import queue as queue_mod
import socket
import threading
import time
import uuid

from rq.executions import Execution
from rq.timeouts import TimerDeathPenalty
from rq.utils import now

from dreamlayer.comfyui.errors import ComfyError
from dreamlayer.img2img.service import Img2ImgRequest
from dreamlayer.jobs import retry_log, slots as slot_mod
from dreamlayer.jobs.mirrored import MirroredJob, Pending
from dreamlayer.jobs.records import REDIS_DOWN, Records, connect
from dreamlayer.jobs.redis_store import PERFORM, QUEUE_NAME, job_options
from dreamlayer.jobs.rq_worker import (DEQUEUE_SLICE_S, QueueWorker, WorkerQueue, current, forget_finished,
                                       on_failure, renew_lease)
from dreamlayer.jobs.store import error_object, run_job

log = logging.getLogger(__name__)

#: Leases (a running job's, a held slot's) are renewed this many times per lease: a renewal may be
#: late (a busy machine) several times over before a live job is taken for a lost one.
RENEWALS_PER_LEASE = 5

#: How long a queue worker must have waited for a job before a request run at once may borrow its
#: slot (QueueWorkers._claim_slot).
LEND_AFTER_S = 0.05

#: RQ's own worker log (a line per job and per second of listening) only from this level.
RQ_LOG_LEVEL = "WARNING"


def perform(job_id: str, quiet: bool = False) -> None:
    """The RQ job: run one img2img job on this worker's service. Never raises for a failed
    generation (that is the job's result); only a lost Redis connection escapes. ``quiet``: a
    synchronous request, whose record gets its prompt and its end but no progress events."""
    current.runtime.run(job_id, quiet)


class QueueWorkers:
    """The queue worker threads of one replica, their lease keeper and their control listener
    (cancel / interrupt announcements from any replica)."""

    def __init__(self, service, config, *, count: int):
        self.service = service
        self.url = config.redis_url
        self.lease_s = config.job_lease_s
        self.count = count
        self.records = Records(connect(self.url), config.job_ttl_s)
        pool = service.pool
        self.slots = None
        if isinstance(pool, slot_mod.SharedBackendPool) and pool.slots is not None:
            self.slots = slot_mod.RedisSlots(connect(self.url), pool, self.lease_s)
            self.slots.lend = self._lend
            pool.shared = self.slots
        self.queue = WorkerQueue(QUEUE_NAME, connection=self.records.redis)
        #: RQ's worker name on the jobs this replica starts at once (run_here)
        self.name = f"img2img-{socket.gethostname()}-{os.getpid()}-at-once"
        self.stopping = threading.Event()
        self.workers: list = []
        self.threads: list = []
        self._started: dict = {}  # job id -> (RQ job, execution) of the runs started at once
        self._later: queue_mod.SimpleQueue = queue_mod.SimpleQueue()  # their writes, made by _write_later
        self._lock = threading.Lock()

    def start(self) -> "QueueWorkers":
        retry_log.install()  # RQ's retry lines while Redis is away, summarised
        for i in range(self.count):
            thread = threading.Thread(target=self._work, name=f"img2img-queue-worker-{i}", daemon=True)
            thread.start()
            self.threads.append(thread)
        for target, name in ((self._keep, "img2img-lease-keeper"), (self._listen, "img2img-queue-control"),
                             (self._write_later, "img2img-job-writer")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def request_stop(self) -> None:
        """Take no more jobs; the running ones go on (stop() waits for them)."""
        self.stopping.set()
        with self._lock:
            for worker in self.workers:
                worker._stop_requested = True

    def stop(self, timeout: float = 10.0, deadline: float | None = None) -> None:
        """Take no more jobs and wait for the running ones: ``timeout`` seconds, or until
        ``deadline`` (time.monotonic())."""
        self.request_stop()
        self._later.put(None)  # after the writes already handed over: they are made first
        deadline = deadline if deadline is not None else time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    # -- the threads ---------------------------------------------------------------------------
    def _work(self) -> None:
        """One worker, restarted after any failure (Redis down: it waits and comes back)."""
        backoff = 0.2
        while not self.stopping.is_set():
            try:
                connection = connect(self.url, socket_timeout=DEQUEUE_SLICE_S + 10)
                queue = WorkerQueue(QUEUE_NAME, connection=connection, death_penalty_class=TimerDeathPenalty)
                queue.lock_s = self.lease_s
                worker = QueueWorker([queue], connection=connection, runtime=self,
                                     name=f"img2img-{uuid.uuid4().hex[:12]}", exception_handlers=[on_failure],
                                     maintenance_interval=max(1, int(self.lease_s // 2)),
                                     worker_ttl=max(30, int(self.lease_s * 2)))
                worker.max_connection_wait_time = 2
                with self._lock:
                    if self.stopping.is_set():
                        return
                    self.workers.append(worker)
                try:
                    worker.work(logging_level=RQ_LOG_LEVEL)
                finally:
                    with self._lock:
                        self.workers.remove(worker)
                backoff = 0.2
            except REDIS_DOWN as exc:  # summarised with RQ's own retry lines (retry_log)
                log.warning("queue worker stopped: could not connect to Redis (%s); restarting in %.1fs",
                            exc, backoff)
            except Exception as exc:  # noqa: BLE001 - a worker thread must come back
                log.warning("queue worker stopped (%s); restarting in %.1fs", exc, backoff)
            self.stopping.wait(backoff)
            backoff = min(backoff * 2, 5.0)

    def _keep(self) -> None:
        """Renew the leases of running jobs and of held slots, RENEWALS_PER_LEASE times a lease."""
        failing = False
        while not self.stopping.wait(self.lease_s / RENEWALS_PER_LEASE):
            try:
                with self._lock:
                    workers = list(self.workers)
                for worker in workers:
                    worker.keep_lease()
                self._keep_started()
                if self.slots is not None:
                    self.slots.renew_all()
                failing = False
            except Exception as exc:  # noqa: BLE001 - Redis down: the next round tries again
                if not failing:  # once per outage, not every round
                    log.warning("could not renew job leases: %s", exc)
                failing = True

    def _write_later(self) -> None:
        """The progress writes of the jobs run at once (run_here), in order, each job's ending
        with RQ's bookkeeping of it."""
        while True:
            write = self._later.get()
            if write is None:
                if self._later.empty():
                    return
                continue
            try:
                write()
            except Exception as exc:  # noqa: BLE001 - this thread goes on with the next write
                log.warning("a job's record write failed: %s", exc)

    def _finished_here(self, job: MirroredJob, rq_job, execution) -> None:
        """After a job run here has its end written: RQ's bookkeeping of it, as RQ's worker does
        (result_ttl=0: nothing kept), and its lease is no longer renewed. Its end not written
        (Redis away for PATIENCE_S, or the run lost its lease), the lease runs out and RQ has the
        job run again."""
        try:
            if job.end_written:
                with self.records.redis.pipeline() as pipe:
                    forget_finished(rq_job, execution, pipe)
                    pipe.execute()
            else:
                log.warning("job %s: its end was not recorded here (lost its lease, or Redis away)", job.id)
        finally:
            with self._lock:
                self._started.pop(job.id, None)

    def _keep_started(self) -> None:
        with self._lock:
            started = list(self._started.values())
        if started:
            with self.records.redis.pipeline() as pipe:
                for rq_job, execution in started:
                    renew_lease(rq_job, execution, self._lease_ttl(), pipe)
                pipe.execute()

    def _lease_ttl(self) -> int:
        return max(1, int(round(self.lease_s)))

    def _listen(self) -> None:
        """Cancel announcements: this replica cancels only the runs it has."""
        lost = False
        while not self.stopping.is_set():
            pubsub = None
            try:
                pubsub = self.records.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.records.control_channel)
                if lost:
                    log.info("queue control channel back")
                lost = False
                while not self.stopping.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is not None:
                        self._control(json.loads(message["data"]))
            except REDIS_DOWN as exc:
                if not lost:  # once per outage
                    log.warning("queue control channel lost (%s); listening again when Redis is back", exc)
                lost = True
                self.stopping.wait(0.5)
            finally:
                if pubsub is not None:
                    pubsub.close()

    def _control(self, message: dict) -> None:
        if "cancel" in message:
            self._cancel(str(message["cancel"]))
        elif message.get("interrupt"):
            for run_id in self.service.active.uncancelled():
                self._cancel(run_id)
        if self.slots is not None:
            self.slots.wake()  # a job here waiting for a slot (taken ahead) that is cancelled stops waiting

    def cancel_here(self, run_id: str) -> None:
        """Cancel a run of this replica without an announcement (a job run here whose record is
        not written yet, which RedisStore.cancel cannot find)."""
        self._cancel(run_id)

    def _cancel(self, run_id: str, retry: bool = False) -> None:
        """Cancel a run of this replica (any other has none by that id: nothing happens). A
        ComfyUI that cannot be reached leaves the run uncancelled: tried again every second
        while it runs here, as the announcement that asked for it is not sent twice."""
        if retry and self.service.active.cancelled(run_id):
            return  # delivered meanwhile (never cancel a prompt twice)
        try:
            _, outcome = self.service.cancel_run(run_id)
        except ComfyError as exc:
            if run_id in self.service.active and not self.stopping.is_set():
                if not retry:
                    log.warning("job %s: the cancel cannot reach ComfyUI (%s); trying again every second",
                                run_id, exc.code)
                timer = threading.Timer(1.0, self._cancel, (run_id, True))
                timer.daemon = True
                timer.start()
            return
        if outcome != "not_found":
            log.info("job %s cancel: %s", run_id, outcome)

    # -- one job -------------------------------------------------------------------------------
    def _claim_slot(self):
        """A backend slot for a job run at once, or None when a job waits in the queue (it goes
        first) or every backend is busy. Idle queue workers hold the free slots (they take one
        before they wait for a job): the slot of one of this replica's is borrowed first — of one
        idle for LEND_AFTER_S at least: a worker that has just begun to wait (its last job just
        ended) may be about to pop a job queued a moment ago, which would then wait for a slot."""
        idle_before = time.monotonic() - LEND_AFTER_S
        with self._lock:
            lenders = any(w.lendable and w.idle_since is not None and w.idle_since <= idle_before
                          for w in self.workers)
        if lenders and not self.records.redis.llen(self.queue.key):
            slot = self.slots.borrow(idle_before=idle_before)
            if slot is not None:
                return slot
        return self.slots.try_acquire(unless_queued=self.queue.key)

    def _lend(self, usable, idle_before: float | None = None):
        """The slot of an idle worker of this replica whose backend is ``usable`` (and, with
        ``idle_before``, idle since then at least), or None: RedisSlots.borrow's source. The
        worker, if it then gets a job, waits for a slot in its turn."""
        with self._lock:
            lenders = [w for w in self.workers if w.lendable and (
                idle_before is None or (w.idle_since is not None and w.idle_since <= idle_before))]
        for worker in lenders:
            with worker.slot_lock:
                if worker.lendable and worker.slot is not None and usable(worker.slot.backend):
                    slot, worker.slot, worker.lendable = worker.slot, None, False
                    return slot
        return None

    def may_take_ahead(self, worker) -> bool:
        """Whether ``worker``, which has no slot, may take the next job now and wait for a slot
        with it (prepared: its record claimed, its inputs decoded), so that it starts the moment
        a prompt here ends, not after RQ's dequeue and preparation (docs/scaling.md, "Cost").
        Only when this replica holds every slot, none of them idle, and no other worker waits
        ahead: the job then waits for a release here only, which wakes it at once — never for an
        idle slot of another replica, nor beside a free backend."""
        if self.slots is None or not self.slots.all_held_here():
            return False
        with self._lock:
            return not any(w is not worker and (w.ahead or w.lendable) for w in self.workers)

    def run_here(self, job_id: str, prepared, request=None) -> MirroredJob | None:
        """Run a synchronous request at once, in the caller's thread, when it would be the next
        job anyway: nothing waits in the queue and a backend slot is free now (None otherwise:
        then it is queued). It is an RQ job all the same, started in RQ's registry with a lease
        this replica renews, so that a replica killed mid-run has it run again by another, like
        any job. What it saves is the trip through the queue (the enqueue, a worker's wake-up,
        RQ's dequeue and preparation, the caller's wake-up at the end): most of what REDIS_URL
        would add to a request (docs/scaling.md, "Cost"). Its inputs are kept in Redis as the
        ``request`` that was sent, when given (compressed images: half the bytes of the decoded
        ones, and this copy is only read if the job must be run again). The writer thread creates
        the job in Redis while the run stages its inputs; its first prompt waits for that, so no
        prompt reaches ComfyUI for a job another replica could not run again."""
        if self.stopping.is_set():
            return None
        slot = None
        if self.slots is not None:
            slot = self._claim_slot()
            if slot is None:
                return None
        elif self.records.redis.llen(self.queue.key):
            return None
        service, attempt = self.service, uuid.uuid4().hex
        released = threading.Event()

        def give_up() -> None:  # the job's last prompt has ended (Lease.release): the slot is free
            if slot is not None and not released.is_set():
                released.set()
                slot_mod.held.slot = None
                self._release(slot)

        service.active.start(job_id)  # before the record exists: a cancel from then on finds the run
        created, handed_over = Pending(), False

        def create() -> None:  # the job, started, its lease and its record: one MULTI
            rq_job = self.queue.create_job(PERFORM, **job_options(job_id, True, self.records.ttl_s))
            rq_job.origin, rq_job.enqueued_at = self.queue.name, now()
            rq_job.redis_server_version = self.queue.get_redis_server_version()
            inputs = pickle.dumps(request if request is not None else prepared, protocol=pickle.HIGHEST_PROTOCOL)
            with self.records.redis.pipeline() as pipe:
                rq_job.prepare_for_execution(self.name, pipeline=pipe)
                rq_job.save(pipeline=pipe)
                execution = Execution.create(rq_job, ttl=self._lease_ttl(), pipeline=pipe)
                self.records.create(job_id, pipe, inputs, attempt=attempt)
                pipe.execute()
            with self._lock:
                self._started[job_id] = (rq_job, execution)

        try:
            # written by the writer thread while the inputs are staged; the first prompt waits for it
            self._later.put(lambda: created.run(create))
            slot_mod.held.slot = slot
            slot_mod.held.give_up = give_up
            # its progress is written beside the run, RQ's bookkeeping after the answer
            job = MirroredJob(job_id, self.records, service, quiet=True, attempt=attempt, later=self._later.put,
                              created=created)
            self._run_job(job, prepared)
            created.wait()  # not created (Redis away): nothing of the job is in Redis, the caller gets a 503
            rq_job, execution = self._started[job_id]
            self._later.put(lambda: self._finished_here(job, rq_job, execution))
            handed_over = True
        finally:
            slot_mod.held.slot = slot_mod.held.give_up = None
            if not handed_over:
                try:
                    created.wait()
                except Exception:  # noqa: BLE001 - raised above, or the run's own error is on its way
                    pass
                with self._lock:
                    self._started.pop(job_id, None)
            service.active.finish(job_id)
            if slot is not None and not released.is_set():
                released.set()
                self._release(slot)
        return job

    def _release(self, slot) -> None:
        try:
            self.slots.release(slot)
        except REDIS_DOWN:
            pass  # its lease runs out

    def run(self, job_id: str, quiet: bool = False) -> None:
        service = self.service
        service.active.start(job_id)  # before reading the record: a cancel from now on finds the run
        try:
            attempt = uuid.uuid4().hex
            record, inputs = self.records.claim(job_id, attempt)
            if inputs is None:
                return  # expired meanwhile, or cancelled while queued
            self._forget_stale_prompt(record)
            job = MirroredJob(job_id, self.records, service, quiet=quiet, attempt=attempt)
            if record.get("cancel_requested"):
                job.finish("cancelled")
                return
            prepared = pickle.loads(inputs)
            if isinstance(prepared, Img2ImgRequest):  # kept as it was sent (run_here): validate it again
                try:
                    prepared = service.prepare(prepared)
                except Exception as exc:  # noqa: BLE001 - e.g. its model is gone: the job's error
                    job.finish("failed", error=error_object(exc))
                    return
            self._run_job(job, prepared)
        finally:
            service.active.finish(job_id)

    def _run_job(self, job: MirroredJob, prepared) -> None:
        """run_job, the images it serves written with its end (one round trip less)."""
        served = self.service.served
        if not hasattr(served, "holding"):
            return run_job(self.service, job, prepared, lambda: self.records.cancel_requested(job.id))
        with served.holding() as held:
            job.images = (served, held)
            run_job(self.service, job, prepared, lambda: self.records.cancel_requested(job.id))

    def _forget_stale_prompt(self, record: dict) -> None:
        """A job run again after its worker died: the prompt that worker queued may still be
        on its backend (when the cleanup could not cancel it); cancel it (only it)."""
        prompt_id = record.get("lost_prompt_id") or record.get("prompt_id")
        if prompt_id:
            self.forget_prompt(prompt_id, record.get("backend"))

    def forget_files(self, job_id: str) -> None:
        """Remove the files a lost run of the job left on the disks this replica shares with
        the others, and make its HTTP uploads small (Img2ImgService.remove_lost_run_files); a
        failure is logged, not raised: the
        job is run again or given up all the same."""
        try:
            self.service.remove_lost_run_files(job_id)
        except (OSError, ValueError) as exc:
            log.warning("job %s: could not remove the files its lost run left behind: %s", job_id, exc)

    def forget_prompt(self, prompt_id: str, url) -> bool:
        """Cancel a lost run's prompt (only it) on the backend at ``url``, so that its GPU does not
        run it for nobody while jobs wait; True once ComfyUI answered (cancelled, or gone)."""
        for backend in self.service.pool.backends:
            if backend.url == url:
                try:
                    outcome = backend.client.cancel(prompt_id)
                except ComfyError:
                    return False
                log.info("the lost run's prompt %s on %s: %s", prompt_id, url, outcome)
                return True
        return False
