"""Queue workers: the threads of a replica that run jobs from the Redis queue (REDIS_URL).

Each is an RQ SimpleWorker (the job runs in the worker's own thread: no fork, so the process's
ComfyUI clients, catalog and sockets are reused, and a job costs no process start) with three
changes: it takes a backend slot before it takes a job (slots.py), it leaves the process's signal
handlers alone (it is not the main thread), and its lease is short and renewed by a keeper thread
while it works, so that a replica killed mid-job loses the job for at most IMG2IMG_JOB_LEASE_S:
then RQ's registry cleanup (run by any idle worker) puts it back on the queue, once.
"""
from __future__ import annotations

import json
import logging
import pickle
import threading
import uuid

from rq import Queue
from rq.exceptions import AbandonedJobError, StopRequested
from rq.executions import Execution, ExecutionRegistry
from rq.timeouts import TimerDeathPenalty
from rq.worker import SimpleWorker, WorkerStatus

from dreamlayer.comfyui.errors import ComfyError
from dreamlayer.jobs import slots as slot_mod
from dreamlayer.jobs.records import FIELDS, REDIS_DOWN, TERMINAL, Records, connect, patiently
from dreamlayer.jobs.redis_store import QUEUE_NAME
from dreamlayer.jobs.store import Job, run_job, queue_position

log = logging.getLogger(__name__)

#: How long one wait for a job lasts before the worker looks at its slot, Redis and stop again.
DEQUEUE_SLICE_S = 1

#: Leases (a running job's, a held slot's) are renewed this many times per lease: a renewal may be
#: late (a busy machine) several times over before a live job is taken for a lost one.
RENEWALS_PER_LEASE = 5

#: RQ's own worker log (a line per job and per second of listening) only from this level.
RQ_LOG_LEVEL = "WARNING"

_current = threading.local()  # the runtime of the worker thread running a job


class MirroredJob(Job):
    """The in-memory job state machine (store.Job) of the worker running it, written through to
    the job's Redis record after every change."""

    def __init__(self, job_id: str, records: Records, service, *, quiet: bool = False, attempt: str | None = None):
        super().__init__(job_id)
        self.records = records
        self.service = service
        self.quiet = quiet
        self.attempt = attempt  # this run's claim on the record (QueueWorkers.run)
        self._warned = False
        self._written = len(self.events)
        if not quiet:
            self.position_of = lambda prompt_id: queue_position(service, prompt_id)

    def _fields(self) -> dict:
        snapshot = self.snapshot()
        fields = {k: snapshot[k] for k in FIELDS}
        client = self.service.active.prompt_of(self.prompt_id) if self.prompt_id else None
        if client is not None:
            fields["backend"] = client.base_url
        return fields

    def _flush(self, finished: bool = False) -> None:
        with self.changed:
            events = [(kind, data) for _, kind, data in self.events[self._written:]]
            self._written = len(self.events)
        if self.quiet and not finished:
            events = []  # a synchronous request: its caller waits for the end, nobody for events
        self.records.write(self.id, self._fields(), events, finished=finished, attempt=self.attempt)

    def _flush_progress(self) -> None:
        """A progress write Redis cannot take is dropped (the status catches up with the next
        one); the run goes on."""
        try:
            self._flush()
        except REDIS_DOWN as exc:
            if not self._warned:
                self._warned = True
                log.warning("job %s: progress not recorded, Redis is away (%s)", self.id, exc)

    def queued(self, prompt_id, index) -> None:
        super().queued(prompt_id, index)
        self._flush_progress()

    def progress(self, event) -> None:
        super().progress(event)
        if not self.quiet:
            self._flush_progress()

    def finish(self, status, *, result=None, error=None) -> None:
        super().finish(status, result=result, error=error)
        patiently(lambda: self._flush(finished=True), what=f"the end of job {self.id}")


def perform(job_id: str, quiet: bool = False) -> None:
    """The RQ job: run one img2img job on this worker's service. Never raises for a failed
    generation (that is the job's result); only a lost Redis connection escapes. ``quiet``: a
    synchronous request, whose record gets its prompt and its end but no progress events."""
    try:
        _current.runtime.run(job_id, quiet)
    finally:
        _current.worker.release_slot()


def on_failure(job, exc_type, exc_value, traceback) -> bool:
    """RQ exception handler: a job whose worker died (AbandonedJobError, found by the registry
    cleanup) goes back to the queue once — say so in its record — or fails for good."""
    ttl = (job.meta or {}).get("ttl_s", 3600)
    records = Records(job.connection, ttl)
    if issubclass(exc_type, AbandonedJobError):
        _forget_executions(job)
    if job.retries_left:
        log.warning("job %s: its worker stopped (%s); queued again", job.id, exc_type.__name__)
        # attempt None: the lost run, should it still be alive (a paused process), writes nothing more
        fields = {"status": "queued", "prompt_id": None, "queue_position": None, "attempt": None}
        lost_prompt = (records.load(job.id) or {}).get("prompt_id")
        if lost_prompt:  # the lost run's prompt may still be on its backend: the next run cancels it
            fields["lost_prompt_id"] = lost_prompt
        records.write(job.id, fields,
                      [("queued", {"type": "queued", "position": None, "prompt_id": None, "requeued": True})])
    else:
        lost = issubclass(exc_type, AbandonedJobError)
        error = {"status": "error", "code": "worker_lost" if lost else "internal_error",
                 "message": ("The workers running this job stopped twice (killed or lost); it was given up"
                             if lost else f"The job's worker failed: {exc_value}"), "http_status": 503 if lost else 500}
        records.write(job.id, {"status": "failed", "error": error}, [("error", {"type": "error", **error})],
                      finished=True)
    return True


def _forget_executions(job) -> None:
    """Drop the executions of an abandoned job. RQ keeps an execution in its job's registry 60 s
    longer than the execution itself (which expires with the lease): a job run again after its
    worker died would otherwise fail RQ's bookkeeping when it succeeds (ValueError: Execution ...
    not found in Redis, an error in the log) and end in RQ's failed registry."""
    registry = ExecutionRegistry(job.id, connection=job.connection)
    with job.connection.pipeline() as pipe:
        for execution_id in registry.get_execution_ids():
            pipe.delete(Execution(execution_id, job.id, job.connection).key)
        pipe.delete(registry.key)
        pipe.execute()


class WorkerQueue(Queue):
    """RQ's queue, with a registry-cleaning lock that lasts a lease instead of RQ's 899 s: a replica
    killed while it cleans (it happens: idle workers clean every half lease) would otherwise keep
    every replica from finding abandoned jobs — so from re-running a killed replica's job — for 15
    minutes. Cleaning takes milliseconds."""

    lock_s = 15

    def acquire_maintenance_lock(self) -> bool:
        return bool(self.connection.set(self.registry_cleaning_key, 1, nx=True, ex=max(1, int(self.lock_s))))


class QueueWorker(SimpleWorker):
    death_penalty_class = TimerDeathPenalty  # jobs have no RQ timeout (-1): ours are per run

    def __init__(self, queues, *, runtime: "QueueWorkers", **kwargs):
        super().__init__(queues, **kwargs)
        self.runtime = runtime
        self.slot = None
        self.running = None  # (job, execution)

    def _install_signal_handlers(self):
        """Not the main thread: the process keeps its own handlers (waitress, Ctrl-C)."""

    def heartbeat(self, *args, **kwargs):
        """Also where a stop request ends a wait: RQ's own dequeue loop retries a lost Redis
        forever and calls this first in every round."""
        if self._stop_requested:
            raise StopRequested()
        if kwargs.get("pipeline") is not None or len(args) > 1:
            return super().heartbeat(*args, **kwargs)
        with self.connection.pipeline() as pipe:  # RQ sends its three commands one by one
            super().heartbeat(*args, pipeline=pipe, **kwargs)
            pipe.execute()

    def get_heartbeat_ttl(self, job, working_time: float = 0.0) -> int:
        return max(1, int(round(self.runtime.lease_s)))

    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        shared = self.runtime.slots
        while not self._stop_requested:
            if shared is not None:
                try:
                    self.slot = shared.try_acquire()
                except REDIS_DOWN:
                    self.runtime.stopping.wait(1.0)  # Redis away: RQ's own dequeue below logs it
                    self.slot = None
                if self.slot is None:  # every backend busy: wait a little, keep our registration fresh
                    try:
                        self.heartbeat()
                        if self.should_run_maintenance_tasks:
                            self.run_maintenance_tasks()
                    except REDIS_DOWN:
                        self.runtime.stopping.wait(1.0)
                    shared.wait_freed(0.05)
                    continue
            result = super().dequeue_job_and_maintain_ttl(DEQUEUE_SLICE_S, max_idle_time=DEQUEUE_SLICE_S)
            if result is not None:
                if self.slot is not None and not self.slot.renew():
                    # the wait outlived the slot's lease (Redis was away) and another worker has
                    # it now: the job takes whichever slot frees first (SharedBackendPool.lease)
                    shared.release(self.slot)
                    self.slot = None
                return result
            if self.slot is not None:
                shared.release(self.slot)
                self.slot = None
        raise StopRequested()

    def execute_job(self, job, queue):
        _current.runtime, _current.worker, slot_mod.held.slot = self.runtime, self, self.slot
        try:
            execution = self.prepare_execution(job)
            self.running = (job, execution)
            self.perform_job(job, queue, execution)
            self.set_state(WorkerStatus.IDLE)
        finally:
            self.running = None
            _current.runtime = _current.worker = slot_mod.held.slot = None
            self.release_slot()

    def release_slot(self) -> None:
        """Free the backend slot as soon as the job's own work is done (before RQ's bookkeeping
        of the job): a spare worker takes it and the next job at once."""
        if self.slot is not None:
            self.runtime.slots.release(self.slot)
            self.slot = slot_mod.held.slot = None

    def keep_lease(self) -> None:
        """Called by the keeper thread: renew the running job's lease in RQ's registry."""
        running = self.running
        if running is not None:
            self.maintain_heartbeats(*running)


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
            pool.shared = self.slots
        self.stopping = threading.Event()
        self.workers: list = []
        self.threads: list = []
        self._lock = threading.Lock()

    def start(self) -> "QueueWorkers":
        for i in range(self.count):
            thread = threading.Thread(target=self._work, name=f"img2img-queue-worker-{i}", daemon=True)
            thread.start()
            self.threads.append(thread)
        for target, name in ((self._keep, "img2img-lease-keeper"), (self._listen, "img2img-queue-control")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        with self._lock:
            for worker in self.workers:
                worker._stop_requested = True
        for thread in self.threads:
            thread.join(timeout)

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
                if self.slots is not None:
                    self.slots.renew_all()
                failing = False
            except Exception as exc:  # noqa: BLE001 - Redis down: the next round tries again
                if not failing:  # once per outage, not every round
                    log.warning("could not renew job leases: %s", exc)
                failing = True

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
            outcome = self.service.cancel_run(str(message["cancel"]))
            if outcome != "not_found":
                log.info("job %s cancel: %s", message["cancel"], outcome)
        elif message.get("interrupt"):
            self.service.interrupt()

    # -- one job -------------------------------------------------------------------------------
    def run(self, job_id: str, quiet: bool = False) -> None:
        service = self.service
        service.active.start(job_id)  # before reading the record: a cancel from now on finds the run
        try:
            with self.records.redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(self.records.key(job_id))
                pipe.get(self.records.inputs_key(job_id))
                raw, inputs = pipe.execute()
            record = self.records.decode(raw)
            if record is None or record.get("status") in TERMINAL or inputs is None:
                return  # expired meanwhile, or cancelled while queued
            # this run's claim: from now on only it writes the record (a run that lost its lease but
            # still runs, its process paused or Redis away too long, cannot spoil the next run's end)
            attempt = uuid.uuid4().hex
            if not self.records.write(job_id, {"attempt": attempt}, []):
                return  # finished meanwhile
            self._forget_stale_prompt(record)
            job = MirroredJob(job_id, self.records, service, quiet=quiet, attempt=attempt)
            if record.get("cancel_requested"):
                job.finish("cancelled")
                return
            run_job(service, job, pickle.loads(inputs), lambda: self.records.cancel_requested(job_id))
        finally:
            service.active.finish(job_id)

    def _forget_stale_prompt(self, record: dict) -> None:
        """A job run again after its worker died: the prompt that worker queued may still be
        on its backend; cancel it (only it) so the GPU does not run it for nobody."""
        prompt_id, url = record.get("lost_prompt_id") or record.get("prompt_id"), record.get("backend")
        if not prompt_id or not url:
            return
        for backend in self.service.pool.backends:
            if backend.url == url:
                try:
                    backend.client.cancel(prompt_id)
                except ComfyError:
                    pass
