"""The job store of a replica when REDIS_URL is set: jobs are RQ jobs on one Redis queue, their
state a Redis record (records.py) that any replica reads; the queue workers (worker.py) of any
replica run them. Same interface as the in-memory JobStore, so the routes do not care which.
"""
from __future__ import annotations

import json
import logging
import pickle
from datetime import datetime, timedelta, timezone
import time
import uuid

from rq import Queue, Retry
from rq.job import Job

from dreamlayer.comfyui.errors import ComfyInterrupted, ComfyTimeout
from dreamlayer.errors import ApiError
from dreamlayer.jobs.changes import Changes
from dreamlayer.jobs.records import TERMINAL, Records, connect, describe, queue_errors
from dreamlayer.jobs.store import error_object

log = logging.getLogger(__name__)

QUEUE_NAME = "dreamlayer-img2img"
#: The function a worker runs for each job (by name: RQ stores it as text).
PERFORM = "dreamlayer.jobs.worker.perform"


def job_options(job_id: str, quiet: bool, ttl_s: float) -> dict:
    """RQ's options for one of our jobs, queued (submit) or started at once (QueueWorkers.run_here)."""
    return {"args": (job_id, quiet), "job_id": job_id, "timeout": -1,
            "description": "img2img",  # not the default: a repr of the inputs
            "result_ttl": 0, "failure_ttl": max(1, int(ttl_s)), "retry": Retry(max=1), "meta": {"ttl_s": ttl_s}}


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


class RedisJob:
    """A handle on one job's record, on any replica. Waiting is woken by the process's one
    subscription to job changes (changes.py), so a change made elsewhere wakes the reader at once."""

    def __init__(self, store: "RedisJobStore", job_id: str):
        self.store = store
        self.id = job_id

    @property
    def records(self) -> Records:
        return self.store.records

    def snapshot(self) -> dict:
        with queue_errors(self.store.url):
            snapshot = self.records.snapshot(self.id)
        if snapshot is None:  # expired between get() and now
            raise self.store.not_found(self.id)
        return snapshot

    def wait_record(self, timeout: float) -> dict | None:
        """The record once the job has finished, or as it is after ``timeout``; None if gone."""
        deadline = time.monotonic() + timeout
        changes, channel = self.store.changes, self.records.channel(self.id)
        with queue_errors(self.store.url), changes.watch(channel):
            while True:
                seen = changes.seq(channel)  # before reading: a change in between still wakes us
                record = self.records.load(self.id)
                if record is None or record.get("status") in TERMINAL or time.monotonic() >= deadline:
                    return record
                changes.wait(channel, seen, deadline)

    def wait_finished(self, timeout: float) -> bool:
        record = self.wait_record(timeout)
        return record is None or record.get("status") in TERMINAL

    def events_after(self, last_id: int, timeout: float):
        changes, channel = self.store.changes, self.records.channel(self.id)
        deadline = time.monotonic() + timeout
        with queue_errors(self.store.url), changes.watch(channel):
            while True:
                seen = changes.seq(channel)
                events, status = self.records.events_and_status(self.id, last_id)
                finished = status is None or status in TERMINAL
                if events or finished or time.monotonic() >= deadline:
                    return events, finished
                changes.wait(channel, seen, deadline)

    def close(self) -> None:
        """Nothing to release: waiting holds no connection of its own."""


class RedisJobStore:
    """Submits jobs to the queue and answers for them from Redis."""

    #: Synchronous requests also run as jobs of the queue (app.py asks this).
    distributed = True

    def __init__(self, service, *, url: str, ttl_s: float, lease_s: float, comfy_timeout_s: float):
        self.service = service
        self.url = url
        self.ttl_s = ttl_s
        self.lease_s = lease_s
        self.comfy_timeout_s = comfy_timeout_s
        self.cancel_wait_s = 2.0
        self.redis = connect(url)
        self.records = Records(self.redis, ttl_s)
        self.changes = Changes(self.redis, self.records.channel("*"))
        self.queue = Queue(QUEUE_NAME, connection=self.redis)
        self.local = None  # this replica's queue workers (QueueWorkers), when it runs any

    def not_found(self, job_id: str) -> ApiError:
        if self.records.existed(job_id):
            return ApiError(f"Job {job_id} finished and has expired (finished jobs are kept {self.ttl_s:g} s)",
                            code="job_expired", status=404)
        return ApiError(f"No job {job_id!r}", code="job_not_found", status=404)

    def submit(self, prepared, *, quiet: bool = False, job_id: str | None = None) -> RedisJob:
        """Record the job and queue it, in one round trip. Its inputs (the validated request)
        travel with it, so that any worker can run it: pickled into a key of their own beside the
        record rather than into RQ's job, which would zlib-compress them (10 ms for a 512² image).
        ``quiet``: no progress events (a synchronous request)."""
        job_id = job_id or uuid.uuid4().hex
        inputs = pickle.dumps(prepared, protocol=pickle.HIGHEST_PROTOCOL)
        with queue_errors(self.url):
            with self.redis.pipeline() as pipe:  # one MULTI: no worker sees the job before its record
                self.queue.enqueue_call(PERFORM, pipeline=pipe, **job_options(job_id, quiet, self.ttl_s))
                self.records.create(job_id, pipe, inputs)
                pipe.execute()
        return RedisJob(self, job_id)

    def get(self, job_id: str) -> RedisJob:
        with queue_errors(self.url):
            if not self.redis.exists(self.records.key(job_id)):
                raise self.not_found(job_id)
        return RedisJob(self, job_id)

    def cancel(self, job_id: str, *, wait: bool = True) -> RedisJob:
        """As JobStore.cancel, from any replica: a job still in the queue is taken out of it and
        cancelled here; a running one is cancelled by the worker that runs it."""
        job = self.get(job_id)
        with queue_errors(self.url):
            if not self.records.request_cancel(job_id):
                return job
            if self.queue.remove(job_id):  # still queued: no worker has it (LREM is atomic)
                self.records.write(job_id, {"status": "cancelled"},
                                   [("cancelled", {"type": "cancelled", "job_id": job_id})], finished=True)
                self.redis.delete(Job.key_for(job_id))  # RQ's own record of it, which nothing will run
                log.info("job %s cancel: removed from the queue", job_id)
            else:
                self.records.announce({"cancel": job_id})
        if wait:
            job.wait_finished(self.cancel_wait_s)
        return job

    def cancel_all(self) -> list:
        with queue_errors(self.url):
            live = self.records.live()
            jobs = [self.cancel(job_id, wait=False) for job_id in live if self.redis.exists(self.records.key(job_id))]
            self.records.announce({"interrupt": True})
        return jobs

    def generate(self, prepared, request=None, job_id: str | None = None) -> dict:
        """A synchronous request: run it as a job and answer as the in-process path would (the
        same result, or the same error object with its status). When this replica runs queue
        workers and the job would be the next one anyway (nothing queued, a backend free), it
        runs here at once (QueueWorkers.run_here); otherwise it waits its turn in the queue.
        ``request``: what ``prepared`` was made of, if known (run_here keeps it, smaller);
        ``job_id``: the job's id, chosen by the caller (to cancel it: ``abandon``)."""
        job_id = job_id or uuid.uuid4().hex
        if self.local is not None:
            with queue_errors(self.url):
                ran = self.local.run_here(job_id, prepared, request)
            if ran is not None:
                return self._answer(ran.snapshot())
        job = self.submit(prepared, quiet=True, job_id=job_id)
        # waiting for a backend (COMFY_TIMEOUT_S, as in-process), then each batch's run, and
        # time for a re-queue should its worker die
        budget = self.comfy_timeout_s * (1 + len(prepared.params.seeds())) + 3 * self.lease_s
        record = job.wait_record(budget)
        if record is None:
            raise self.not_found(job.id)
        if record.get("status") not in TERMINAL:
            self.cancel(job.id, wait=False)
            raise ComfyTimeout(budget, f"The job did not finish within {budget:g}s (no queue worker took it, "
                                       "or its runs took too long; see COMFY_TIMEOUT_S)")
        return self._answer(record)

    def abandon(self, job_id: str) -> None:
        """A synchronous request's client went away: cancel its job wherever it is (in the
        queue, on any replica's worker, or run here before its record is written)."""
        try:
            self.cancel(job_id, wait=False)
        except ApiError as exc:
            if exc.status != 404:
                raise
            if self.local is not None:
                self.local.cancel_here(job_id)

    @staticmethod
    def _answer(record: dict) -> dict:
        """A finished job's record as the synchronous answer: its result, or its error raised."""
        if record["status"] == "succeeded":
            return record["result"]
        error = record.get("error") or error_object(ComfyInterrupted(message="The generation was interrupted"))
        body = dict(error)
        status = body.pop("http_status", 500)
        body.pop("status", None)
        code, message = body.pop("code"), body.pop("message")
        raise ApiError(message, code=code, status=status, **body)

    def health(self) -> dict:
        """The queue as /health shows it."""
        try:
            started = self.queue.started_job_registry
            with self.redis.pipeline() as pipe:
                pipe.llen(self.queue.key)
                pipe.scard(self.records.live_key)
                pipe.zrange(started.key, 0, -1)
                in_queue, live, running = pipe.execute()
            queued = in_queue + self._taken_ahead([started.parse_job_id(entry) for entry in running])
            from rq import Worker

            # alive = heard from within a lease (a killed replica's workers stay registered ~90 s)
            recent = datetime.now(timezone.utc) - timedelta(seconds=max(5.0, self.lease_s))
            workers = sum(1 for w in Worker.all(queue=self.queue)
                          if w.last_heartbeat is not None and _aware(w.last_heartbeat) >= recent)
            return {"redis": describe(self.url), "reachable": True, "queued": queued, "unfinished": live,
                    "workers": workers}
        except Exception as exc:  # noqa: BLE001 - health answers, whatever Redis does
            return {"redis": describe(self.url), "reachable": False, "error": str(exc)}

    def _taken_ahead(self, started: list) -> int:
        """How many of RQ's started jobs are still waiting for a backend (status "queued", no
        prompt): taken from the queue ahead by a replica holding every slot, so no longer in RQ's
        queue, or waiting for a retry. A job whose prompt waits in ComfyUI's queue (its status is
        "queued" too, with a prompt id) has its backend."""
        if not started:
            return 0
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in started:
                pipe.hmget(self.records.key(job_id), "status", "prompt_id")
            return sum(1 for status, prompt_id in pipe.execute()
                       if status is not None and json.loads(status) == "queued"
                       and (prompt_id is None or json.loads(prompt_id) is None))

    def shutdown(self) -> None:
        self.changes.close()
        self.redis.close()
