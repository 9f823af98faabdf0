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
import os
import pickle
import queue as queue_mod
import socket
import threading
import time
import uuid

from redis.exceptions import NoScriptError
from rq import Queue
from rq.exceptions import AbandonedJobError, StopRequested
from rq.executions import Execution, ExecutionRegistry
from rq.timeouts import TimerDeathPenalty
from rq.utils import now
from rq.worker import SimpleWorker, WorkerStatus

from dreamlayer.comfyui.errors import ComfyError
from dreamlayer.jobs import slots as slot_mod
from dreamlayer.jobs.records import FIELDS, REDIS_DOWN, Records, connect, patiently
from dreamlayer.jobs.redis_store import PERFORM, QUEUE_NAME, job_options
from dreamlayer.img2img.service import Img2ImgRequest
from dreamlayer.jobs.store import Job, error_object, run_job, queue_position

log = logging.getLogger(__name__)

#: How long one wait for a job lasts before the worker looks at its slot, Redis and stop again.
DEQUEUE_SLICE_S = 1

#: RQ's plain worker heartbeats, at most this often (QueueWorker.heartbeat).
HEARTBEAT_EVERY_S = 1.0

#: Leases (a running job's, a held slot's) are renewed this many times per lease: a renewal may be
#: late (a busy machine) several times over before a live job is taken for a lost one.
RENEWALS_PER_LEASE = 5

#: RQ's own worker log (a line per job and per second of listening) only from this level.
RQ_LOG_LEVEL = "WARNING"

_current = threading.local()  # the runtime of the worker thread running a job


class MirroredJob(Job):
    """The in-memory job state machine (store.Job) of the worker running it, written through to
    the job's Redis record after every change: at once, or (``later``, a job run at once for a
    synchronous request) by a writer thread, in order, so that its run does not wait for them;
    its end always at once (when the caller has its answer, the job reads as finished)."""

    def __init__(self, job_id: str, records: Records, service, *, quiet: bool = False, attempt: str | None = None,
                 later=None):
        super().__init__(job_id)
        self.records = records
        self.service = service
        self.quiet = quiet
        self.later = later  # None, or a callable that runs a write later (QueueWorkers._write_later)
        self.attempt = attempt  # this run's claim on the record (QueueWorkers.run)
        self.end_written = False
        self.images = None  # (RedisImages, the images it holds for the end's write), see QueueWorkers.held_images
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
        """Write what changed since the last flush (read now, written now or later)."""
        with self.changed:
            events = [(kind, data) for _, kind, data in self.events[self._written:]]
            self._written = len(self.events)
        if self.quiet:  # a synchronous request: its caller waits for the end, nobody for events
            events = events[-1:] if finished else []
        fields = self._fields()

        def write():
            if finished:
                # False: another run has the job now (this one lost its lease), or it ended already
                self.end_written = patiently(lambda: self._write_end(fields, events), what=f"the end of job {self.id}")
                return
            try:  # a progress write Redis cannot take is dropped: the status catches up with the next one
                self.records.write(self.id, fields, events, attempt=self.attempt)
            except REDIS_DOWN as exc:
                if not self._warned:
                    self._warned = True
                    log.warning("job %s: progress not recorded, Redis is away (%s)", self.id, exc)

        if self.later is None or finished:  # the end at once: once answered, a job reads as finished
            write()
        else:
            self.later(write)

    def _write_end(self, fields: dict, events: list) -> bool:
        """The end, and the images the run made (held until now), in one round trip."""
        images, held = self.images or (None, None)
        if not held:
            return self.records.write(self.id, fields, events, finished=True, attempt=self.attempt)
        for _ in range(2):
            with self.records.redis.pipeline(transaction=False) as pipe:
                images.write_held(pipe, held)
                self.records.queue_write(pipe, self.id, fields, events, finished=True, attempt=self.attempt)
                try:
                    written = bool(pipe.execute()[-1])
                    break
                except NoScriptError:  # Redis restarted since the script was loaded
                    self.records.load_script()
        else:
            raise RuntimeError("Redis keeps forgetting the record script")
        held.clear()
        return written

    def queued(self, prompt_id, index) -> None:
        super().queued(prompt_id, index)
        self._flush()

    def progress(self, event) -> None:
        super().progress(event)
        if not self.quiet:
            self._flush()

    def finish(self, status, *, result=None, error=None) -> None:
        super().finish(status, result=result, error=error)
        self._flush(finished=True)


def perform(job_id: str, quiet: bool = False) -> None:
    """The RQ job: run one img2img job on this worker's service. Never raises for a failed
    generation (that is the job's result); only a lost Redis connection escapes. ``quiet``: a
    synchronous request, whose record gets its prompt and its end but no progress events."""
    _current.runtime.run(job_id, quiet)


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


def renew_lease(job, execution, ttl: int, pipe) -> None:
    """Extend a running job's lease (its execution's TTL and its scores in RQ's registries) with
    writes that do nothing once the job has ended and RQ's records of it are gone: RQ's own
    heartbeats (HSET last_heartbeat on the job and the execution) bring a just-deleted job's hash
    back, without a TTL, when the renewal crosses the job's end."""
    pipe.expire(execution.key, ttl)
    job.started_job_registry.add_execution(execution, ttl=ttl, pipeline=pipe, xx=True)
    ExecutionRegistry(job_id=job.id, connection=pipe).add(execution=execution, ttl=ttl, pipeline=pipe, xx=True)


def forget_finished(job, execution, pipe) -> None:
    """Delete RQ's record of a finished job of ours (result_ttl=0: nothing is kept) as Job.delete
    and cleanup_execution do for a job like ours, with no dependents, no stored result and no rate
    limit, but without their reads: queued on ``pipe``, no round trip of its own."""
    execution.delete(job=job, pipeline=pipe)
    pipe.delete(job.key, job.dependents_key, job.dependencies_key, job.execution_registry.key)


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
        #: True while it waits for a job holding a slot: a request run at once may take the slot
        #: (QueueWorkers._claim_slot); a job it then gets waits for a slot in the pool's lease()
        self.lendable = False
        self.slot_lock = threading.Lock()

    def _install_signal_handlers(self):
        """Not the main thread: the process keeps its own handlers (waitress, Ctrl-C)."""

    def heartbeat(self, *args, **kwargs):
        """Also where a stop request ends a wait: RQ's own dequeue loop retries a lost Redis
        forever and calls this first in every round. RQ's plain heartbeats (before and after each
        wait for a job) are sent at most once per HEARTBEAT_EVERY_S: they only keep the worker's
        registration (worker_ttl, 30 s or more) alive, and each costs a round trip between two jobs."""
        if self._stop_requested:
            raise StopRequested()
        beat_at, self._beat_at = getattr(self, "_beat_at", None), time.monotonic()
        if kwargs.get("pipeline") is not None or len(args) > 1:
            return super().heartbeat(*args, **kwargs)
        if not args and not kwargs and beat_at is not None and self._beat_at - beat_at < HEARTBEAT_EVERY_S:
            self._beat_at = beat_at
            return None
        with self.connection.pipeline() as pipe:  # RQ sends its three commands one by one
            super().heartbeat(*args, pipeline=pipe, **kwargs)
            pipe.execute()

    def prepare_execution(self, job):
        """RQ's two writes before a job (its execution, then the job started: prepare_execution
        and prepare_job_execution) in one round trip."""
        with self.connection.pipeline() as pipe:
            ttl = self.get_heartbeat_ttl(job)
            execution = Execution.create(job, ttl, pipeline=pipe, worker_name=self.name)
            self.executions[execution.id] = execution
            self.set_state(WorkerStatus.BUSY, pipeline=pipe)
            self.heartbeat(ttl, pipeline=pipe)
            job.heartbeat(now(), ttl, pipeline=pipe)
            job.prepare_for_execution(self.name, pipeline=pipe)
            pipe.persist(job.key)
            pipe.lrem(Queue(job.origin, connection=self.connection).intermediate_queue_key, 1, job.id)
            pipe.execute()
        self._prepared = job.id
        return execution

    def prepare_job_execution(self, job, remove_from_intermediate_queue: bool = False) -> None:
        if getattr(self, "_prepared", None) == job.id:  # done with the execution (prepare_execution)
            self._prepared = None
            return
        super().prepare_job_execution(job, remove_from_intermediate_queue)

    def handle_execution_ended(self, job, queue, heartbeat_ttl):
        """As RQ's, less the heartbeat of a job about to be deleted (a round trip between jobs)."""
        job.ended_at = now()

    def handle_job_success(self, job, queue, started_job_registry, execution):
        """As RQ's for jobs like ours (no dependents, no repeats, no result kept): one pipeline
        instead of a WATCH transaction and three reads, which took about 10 ms of this process's
        time while the next job on the freed backend was being started."""
        slots = self.runtime.slots
        with self.connection.pipeline() as pipe:
            self.increment_successful_job_count(pipeline=pipe)
            self.increment_total_working_time(job.ended_at - job.started_at, pipe)
            forget_finished(job, execution, pipe)
            self.set_state(WorkerStatus.IDLE, pipeline=pipe)
            if self.slot is not None:  # may it keep its slot for the next job? (execute_job)
                slots.mark_wanted_query(pipe, self.slot.backend)
            results = pipe.execute()
        self.executions.pop(execution.id, None)
        self.slot_wanted = self.slot is not None and bool(results[-1])

    def set_state(self, state, pipeline=None):
        """A state it has already is not written again (RQ sets IDLE before every wait for a job)."""
        if pipeline is None and state == getattr(self, "_state", None):
            return
        super().set_state(state, pipeline)

    def get_heartbeat_ttl(self, job, working_time: float = 0.0) -> int:
        return max(1, int(round(self.runtime.lease_s)))

    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        shared = self.runtime.slots
        while not self._stop_requested:
            if shared is not None and self.slot is None:  # (a slot kept from the last job: execute_job)
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
            with self.slot_lock:
                self.lendable = self.slot is not None
            try:
                result = super().dequeue_job_and_maintain_ttl(DEQUEUE_SLICE_S, max_idle_time=DEQUEUE_SLICE_S)
            finally:
                with self.slot_lock:
                    self.lendable = False
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
        self.release_slot()  # one kept from its last job
        raise StopRequested()

    def execute_job(self, job, queue):
        """RQ's, keeping the backend slot for the next job when the job succeeded, its backend
        answers and no job waiting to be retried wants it: the worker takes the next job from the queue
        at once, with no hand-over of the slot to another worker (a wake-up and two round trips
        between two prompts on the backend)."""
        _current.runtime, _current.worker, slot_mod.held.slot = self.runtime, self, self.slot
        keep = False
        try:
            execution = self.prepare_execution(job)
            self.running = (job, execution)
            self.slot_wanted = True
            succeeded = self.perform_job(job, queue, execution)
            self.set_state(WorkerStatus.IDLE)
            keep = succeeded and not self.slot_wanted and self.slot is not None and self.slot.backend.reachable
        finally:
            self.running = None
            _current.runtime = _current.worker = slot_mod.held.slot = None
            if not keep:
                self.release_slot()

    def release_slot(self) -> None:
        if self.slot is not None:
            self.runtime.slots.release(self.slot)
            self.slot = slot_mod.held.slot = None

    def keep_lease(self) -> None:
        """Called by the keeper thread: renew the running job's lease in RQ's registry."""
        running = self.running
        if running is not None:
            self.maintain_heartbeats(*running)

    def maintain_heartbeats(self, job, execution):
        """RQ's, with renew_lease for the job's part (see there)."""
        with self.connection.pipeline() as pipe:
            self.heartbeat(self.job_monitoring_interval + 60, pipeline=pipe)
            renew_lease(job, execution, int(self.get_heartbeat_ttl(job)), pipe)
            pipe.execute()


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

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        self._later.put(None)  # after the writes already handed over: they are made first
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
            outcome = self.service.cancel_run(str(message["cancel"]))
            if outcome != "not_found":
                log.info("job %s cancel: %s", message["cancel"], outcome)
        elif message.get("interrupt"):
            self.service.interrupt()

    # -- one job -------------------------------------------------------------------------------
    def _claim_slot(self):
        """A backend slot for a job run at once, or None when a job waits in the queue (it goes
        first) or every backend is busy. Idle queue workers hold the free slots (they take one
        before they wait for a job): the slot of one of this replica's is borrowed first."""
        with self._lock:
            lenders = [w for w in self.workers if w.lendable]
        if lenders and not self.records.redis.llen(self.queue.key):
            for worker in lenders:
                with worker.slot_lock:
                    if worker.lendable and worker.slot is not None:
                        slot, worker.slot, worker.lendable = worker.slot, None, False
                        return slot
        return self.slots.try_acquire(unless_queued=self.queue.key)

    def run_here(self, job_id: str, prepared, request=None) -> MirroredJob | None:
        """Run a synchronous request at once, in the caller's thread, when it would be the next
        job anyway: nothing waits in the queue and a backend slot is free now (None otherwise:
        then it is queued). It is an RQ job all the same, started in RQ's registry with a lease
        this replica renews, so that a replica killed mid-run has it run again by another, like
        any job. What it saves is the trip through the queue (the enqueue, a worker's wake-up,
        RQ's dequeue and preparation, the caller's wake-up at the end): most of what REDIS_URL
        would add to a request (docs/scaling.md, "Cost"). Its inputs are kept in Redis as the
        ``request`` that was sent, when given (compressed images: half the bytes of the decoded
        ones, and this copy is only read if the job must be run again)."""
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
        service.active.start(job_id)  # before the record exists: a cancel from then on finds the run
        handed_over = False
        try:
            rq_job = self.queue.create_job(PERFORM, **job_options(job_id, True, self.records.ttl_s))
            rq_job.origin, rq_job.enqueued_at = self.queue.name, now()
            rq_job.redis_server_version = self.queue.get_redis_server_version()
            inputs = pickle.dumps(request if request is not None else prepared, protocol=pickle.HIGHEST_PROTOCOL)
            with self.records.redis.pipeline() as pipe:  # the job, started, its lease and its record: one MULTI
                rq_job.prepare_for_execution(self.name, pipeline=pipe)
                rq_job.save(pipeline=pipe)
                execution = Execution.create(rq_job, ttl=self._lease_ttl(), pipeline=pipe)
                self.records.create(job_id, pipe, inputs, attempt=attempt)
                pipe.execute()
            with self._lock:
                self._started[job_id] = (rq_job, execution)
            slot_mod.held.slot = slot
            # its progress is written beside the run, RQ's bookkeeping after the answer
            job = MirroredJob(job_id, self.records, service, quiet=True, attempt=attempt, later=self._later.put)
            self._run_job(job, prepared)
            self._later.put(lambda: self._finished_here(job, rq_job, execution))
            handed_over = True
        finally:
            slot_mod.held.slot = None
            if not handed_over:
                with self._lock:
                    self._started.pop(job_id, None)
            service.active.finish(job_id)
            if slot is not None:
                try:
                    self.slots.release(slot)
                except REDIS_DOWN:
                    pass  # its lease runs out
        return job

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
