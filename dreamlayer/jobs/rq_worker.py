"""RQ's worker, as this service's queue workers use it (worker.py runs them, several per process).

Each is an RQ SimpleWorker (the job runs in the worker's own thread: no fork, so the process's
ComfyUI clients, catalog and sockets are reused, and a job costs no process start) with these
changes: it takes a backend slot before it takes a job (slots.py) and keeps it for the next job
when it can; it leaves the process's signal handlers alone (it is not the main thread); its lease
is short and renewed by a keeper thread while it works, so that a replica killed mid-job loses the
job for at most IMG2IMG_JOB_LEASE_S (then RQ's registry cleanup, run by any idle worker, puts it
back on the queue, once); and RQ's bookkeeping around a job takes fewer round trips (docs/scaling.md,
"Cost").
"""
from __future__ import annotations

import inspect
import logging
import threading
import time
from typing import TYPE_CHECKING

from rq import Queue, worker_registration
from rq.exceptions import AbandonedJobError, StopRequested
from rq.executions import Execution, ExecutionRegistry
from rq.timeouts import TimerDeathPenalty
from rq.utils import now
from rq.worker import SimpleWorker, WorkerStatus

from dreamlayer.jobs import slots as slot_mod
from dreamlayer.jobs.records import REDIS_DOWN, TERMINAL, Records

if TYPE_CHECKING:
    from dreamlayer.jobs.worker import QueueWorkers

log = logging.getLogger(__name__)

#: How long one wait for a job lasts before the worker looks at its slot, Redis and stop again.
DEQUEUE_SLICE_S = 1

#: RQ's plain worker heartbeats, at most this often (QueueWorker.heartbeat).
HEARTBEAT_EVERY_S = 1.0

#: A worker with no slot looks for one this often while jobs wait in the queue (a slot another
#: replica frees goes to them at once)...
POLL_S = 0.05
#: ...and, once that many looks in a row found none, checks the queue: while it is empty it looks
#: half as often each time, down to once every IDLE_POLL_MAX_S (QueueWorker._poll_wait).
QUIET_AFTER = 4
IDLE_POLL_MAX_S = 1.0

#: The runtime and worker of the thread running a job (set by QueueWorker.execute_job, read by
#: worker.perform, the function RQ calls); ``cleaner``: the runtime of a worker running RQ's
#: upkeep (QueueWorker.run_maintenance_tasks, read by on_failure).
current = threading.local()


def on_failure(job, exc_type, exc_value, traceback) -> bool:
    """RQ exception handler: a job whose worker died (AbandonedJobError, found by the registry
    cleanup) goes back to the queue once — say so in its record — or fails for good. With Redis
    away nothing can be said: the job runs again once its lease has run out."""
    try:
        return _on_failure(job, exc_type, exc_value)
    except REDIS_DOWN as exc:
        log.warning("job %s: its worker stopped (%s) while Redis is away (%s); it runs again once its "
                    "lease has run out", job.id, exc_type.__name__, exc)
        return True


def _on_failure(job, exc_type, exc_value) -> bool:
    ttl = (job.meta or {}).get("ttl_s", 3600)
    records = Records(job.connection, ttl)
    record, cleaner = records.load(job.id) or {}, getattr(current, "cleaner", None)
    if issubclass(exc_type, AbandonedJobError):
        _forget_executions(job)
        if cleaner is not None and record.get("status") not in TERMINAL:
            # its staged inputs: a run again on another backend would not overwrite them
            cleaner.forget_files(job.id)
    if job.retries_left:
        # attempt None: the lost run, should it still be alive (a paused process), writes nothing more
        fields = {"status": "queued", "prompt_id": None, "queue_position": None, "attempt": None}
        lost_prompt = record.get("prompt_id")
        # the lost run's prompt may still run on its backend, for nobody, while jobs wait for that
        # backend: cancelled now by the worker cleaning up, else by the job's next run
        if lost_prompt and not (cleaner is not None and cleaner.forget_prompt(lost_prompt, record.get("backend"))):
            fields["lost_prompt_id"] = lost_prompt
        records.write(job.id, fields,
                      [("queued", {"type": "queued", "position": None, "prompt_id": None, "requeued": True})])
        log.warning("job %s: its worker stopped (%s); queued again", job.id, exc_type.__name__)
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
        self.idle_since = None  # since when it has waited for a job with nothing to run (None: busy)
        #: True while it waits for a job with no slot, to take it ahead (QueueWorkers.may_take_ahead)
        self.ahead = False
        self.slot_lock = threading.Lock()
        self.misses = 0  # looks for a slot in a row that found none (_poll_wait)
        self.poll_wait = POLL_S  # the wait before the next look

    def _install_signal_handlers(self):
        """Not the main thread: the process keeps its own handlers (waitress, Ctrl-C)."""

    def teardown(self):
        """As RQ's (no scheduler here), but the command channel is left even when Redis is away
        (RQ's skips it when its register_death fails, leaving the listening thread behind)."""
        try:
            self.register_death()
        except REDIS_DOWN:
            self.unsubscribe(reachable=False)
            raise
        self.unsubscribe()

    def unsubscribe(self, reachable: bool = True):
        """Stop the thread listening on the command channel; the thread closes its connection
        as it ends. (RQ's closes it too, after a 1 s join; when Redis is away the thread sleeps 2 s
        between tries, and both closed it at once: an AttributeError in redis-py's thread.)"""
        thread, self.pubsub_thread = self.pubsub_thread, None
        if thread is None:
            return
        if "timeout" in inspect.signature(thread.stop).parameters:
            thread.stop(timeout=0)  # redis-py 8.2 joins the thread here: its wait ends below, not here
        else:
            thread.stop()
        if reachable:
            try:
                self.pubsub.unsubscribe()  # ends its wait for a message at once
            except REDIS_DOWN:
                return  # it ends after its next try
            thread.join(timeout=1)

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
            # registered again (idempotent): a Redis that restarted without its data forgot the
            # workers, and /health's count of live workers would stay low for good
            worker_registration.register(self, pipe)
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
                slots.queue_is_wanted(pipe, self.slot.backend)
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

    def run_maintenance_tasks(self):
        """RQ's upkeep, registry cleanup included: on_failure can reach the backends from here."""
        current.cleaner = self.runtime
        try:
            super().run_maintenance_tasks()
        finally:
            current.cleaner = None

    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        shared = self.runtime.slots
        while not self._stop_requested:
            self.ahead = False
            if shared is not None and self.slot is None:  # (a slot kept from the last job: execute_job)
                try:
                    self.slot = shared.try_acquire()
                except REDIS_DOWN:
                    self.runtime.stopping.wait(1.0)  # Redis away: RQ's own dequeue below logs it
                    self.slot = None
                if self.slot is None and self.runtime.may_take_ahead(self):
                    self.ahead = True  # every slot is this process's, all busy: take the next job now
                elif self.slot is None:  # every backend busy: wait a little, keep our registration fresh
                    try:
                        self.heartbeat()
                        if self.should_run_maintenance_tasks:
                            self.run_maintenance_tasks()
                        self.poll_wait = self._poll_wait()
                    except REDIS_DOWN:
                        self.runtime.stopping.wait(1.0)
                    shared.wait_freed(self.poll_wait)
                    continue
                self.misses, self.poll_wait = 0, POLL_S
            with self.slot_lock:
                self.lendable = self.slot is not None
                if self.idle_since is None:
                    self.idle_since = time.monotonic()
            if self.lendable and shared.waiting:
                shared.wake()  # a job here waits for a slot (taken ahead): it borrows this one
            try:
                result = super().dequeue_job_and_maintain_ttl(DEQUEUE_SLICE_S, max_idle_time=DEQUEUE_SLICE_S)
            finally:
                with self.slot_lock:
                    self.lendable = False
                self.ahead = False
            if result is not None:
                self.idle_since = None
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

    def _poll_wait(self) -> float:
        """How long to wait before looking for a slot again, every slot being held — by running
        jobs, or by idle workers of other replicas, which take theirs again after each empty wait
        for a job. While jobs wait in the queue: POLL_S, so that a slot freed elsewhere goes to
        them at once. While the queue is empty a free slot is of no use yet: looks get rarer, down
        to one a second (idle replicas that share the slots had each spent 5 % of a core looking
        20 times a second per worker; docs/scaling.md). A release in this process still wakes it at
        once (wait_freed)."""
        self.misses += 1
        if self.misses < QUIET_AFTER:
            return POLL_S
        if self.runtime.queue.count:
            self.misses = 0
            return POLL_S
        return min(IDLE_POLL_MAX_S, POLL_S * 2 ** (self.misses - QUIET_AFTER + 1))

    def execute_job(self, job, queue):
        """RQ's, keeping the backend slot for the next job when the job succeeded, its backend
        answers and no job waiting to be retried wants it: the worker takes the next job from the queue
        at once, with no hand-over of the slot to another worker (a wake-up and two round trips
        between two prompts on the backend)."""
        current.runtime, current.worker, slot_mod.held.slot = self.runtime, self, self.slot
        slot_mod.held.give_up = self._give_up_slot  # the job's last prompt has ended (Lease.release)
        # a job waiting for a slot (taken ahead, or a retry) stops waiting when it is cancelled
        slot_mod.held.cancelled = lambda: self.runtime.service.active.cancelled(job.id)
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
            current.runtime = current.worker = slot_mod.held.slot = slot_mod.held.give_up = None
            slot_mod.held.cancelled = None
            if not keep:
                self.release_slot()

    def _give_up_slot(self) -> None:
        """The job's last prompt has ended. When its outputs must still be downloaded (GET /view:
        a backend without a shared output folder; megabytes over a network), the slot goes to the
        spare worker at once, which starts the next job on the backend meanwhile. Otherwise the
        rest of the job is quick (a hard link, the end's write) and the worker keeps the slot for
        its next job: a hand-over costs a wake-up and two round trips, which measured slower here
        (docs/scaling.md, "Cost")."""
        if self.slot is not None and (self.slot.backend.output_dir is None or self.runtime.slots.waiting):
            self.release_slot()

    def release_slot(self) -> None:
        """Hand the slot back to every replica."""
        with self.slot_lock:
            slot, self.slot = self.slot, None
        slot_mod.held.slot = None
        if slot is not None:
            self.runtime.slots.release(slot)

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
