"""Asynchronous img2img jobs: run in the background, watched through status polls or a
Server-Sent-Events stream, cancellable, kept for a bounded time after they finish.

A job is a prepared request (validated before the 202 answer) executed on a worker thread by
the same code as the synchronous path; its events come from ComfyUI's WebSocket messages.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor

from dreamlayer.comfyui.errors import ComfyError, ComfyInterrupted
from dreamlayer.errors import ApiError
from dreamlayer.img2img.long_requests import Busy
from dreamlayer.img2img.service import Img2ImgService, Listener, Prepared, cancel_each

log = logging.getLogger(__name__)

TERMINAL = ("succeeded", "failed", "cancelled")
#: The SSE event ending a stream, per terminal status.
FINAL_EVENT = {"succeeded": "done", "failed": "error", "cancelled": "cancelled"}


def error_object(exc: BaseException) -> dict:
    """The same error object the synchronous path answers with, plus its HTTP status."""
    if isinstance(exc, ApiError):
        return {**exc.to_dict(), "http_status": exc.status}
    if isinstance(exc, ComfyError):
        return {"status": "error", "code": exc.code, "message": str(exc), **exc.details(), "http_status": exc.status}
    log.exception("job failed unexpectedly", exc_info=exc)
    return {"status": "error", "code": "internal_error", "message": "The service failed unexpectedly; see its log",
            "http_status": 500}


class Job(Listener):
    """One background generation. Thread-safe; ``changed`` wakes every waiting event stream."""

    def __init__(self, job_id: str):
        self.id = job_id
        self.status = "queued"
        self.prompt_id = None
        self.queue_position = None
        self.step = {"value": None, "max": None, "node": None}  # the latest progress
        self.result = None
        self.error = None
        self.finished_at = None
        self.cancel_requested = False
        self.cancelled_prompt: dict = {}  # {prompt id: outcome} of the cancel sent to ComfyUI
        self.events: list = []  # (id, kind, data)
        self.changed = threading.Condition()
        self.position_of = None  # set by the store: prompt_id -> queue position or None

    # -- Listener (called on the generating thread) -------------------------------------------
    def queued(self, prompt_id: str, index: int) -> None:
        with self.changed:
            self.prompt_id = prompt_id
        self._queue_update()

    def progress(self, event) -> None:
        if event.kind == "queued":
            self._queue_update()
        elif event.kind in ("started", "executing", "cached"):
            with self.changed:
                if self.status == "queued":
                    self.status = "running"
                    self.queue_position = 0
                if event.kind == "executing":
                    self.step = {**self.step, "node": event.node}
        elif event.kind == "progress":
            with self.changed:
                self.status = "running" if self.status == "queued" else self.status
                self.queue_position = 0
                self.step = {"value": event.value, "max": event.max, "node": event.node}
            self._emit("progress", dict(self.step))

    def retrying(self, reason: str) -> None:
        """Queued again (status, SSE event ``queued`` with ``retry: true``) until another backend
        takes the run: its progress starts over there."""
        with self.changed:
            if self.status in TERMINAL:
                return
            self.status, self.prompt_id, self.queue_position = "queued", None, None
            self.step = {"value": None, "max": None, "node": None}
            self._emit_locked("queued", {"position": None, "prompt_id": None, "retry": True, "reason": reason})

    def _queue_update(self) -> None:
        with self.changed:
            if self.status != "queued" or not self.prompt_id:
                return
            prompt_id = self.prompt_id
        position = self.position_of(prompt_id) if self.position_of else None
        with self.changed:
            if self.status == "queued" and position != self.queue_position:
                self.queue_position = position
                self._emit_locked("queued", {"position": position, "prompt_id": prompt_id})

    # -- state ---------------------------------------------------------------------------------
    def _emit(self, kind: str, data: dict) -> None:
        with self.changed:
            self._emit_locked(kind, data)

    def _emit_locked(self, kind: str, data: dict) -> None:
        self.events.append((len(self.events) + 1, kind, {"type": kind, **data}))
        self.changed.notify_all()

    def finish(self, status: str, *, result=None, error=None) -> None:
        with self.changed:
            if self.status in TERMINAL:
                return
            self.status, self.result, self.error = status, result, error
            self.finished_at = time.monotonic()
            data = {"succeeded": result, "failed": error, "cancelled": {"job_id": self.id}}[status] or {}
            self._emit_locked(FINAL_EVENT[status], dict(data))

    def snapshot(self) -> dict:
        with self.changed:
            return {"job_id": self.id, "status": self.status, "prompt_id": self.prompt_id,
                    "queue_position": self.queue_position, "progress": dict(self.step),
                    "result": self.result, "error": self.error}

    def close(self) -> None:
        """Nothing to release for a job in memory (a Redis job closes its subscription)."""

    def wait_finished(self, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.status in TERMINAL, timeout)

    def events_after(self, last_id: int, timeout: float):
        """Events newer than ``last_id`` (waiting up to ``timeout`` for one), and whether the job
        has finished."""
        with self.changed:
            if len(self.events) <= last_id and self.status not in TERMINAL:
                self.changed.wait(timeout)
            return self.events[last_id:], self.status in TERMINAL


def run_job(service: Img2ImgService, job: Job, prepared: Prepared, cancel_requested) -> None:
    """Run one job to its end on this thread: every outcome (result, error, cancel) becomes the
    job's final state. ``cancel_requested()`` tells an interrupt asked for by the job's owner
    from one that came from elsewhere (then the job failed)."""
    try:
        result = service.execute(prepared, run_id=job.id, listener=job)
    except ComfyInterrupted as exc:
        if cancel_requested():
            job.finish("cancelled")
        else:
            job.finish("failed", error=error_object(exc))
    except BaseException as exc:  # noqa: BLE001 - every failure becomes the job's error
        job.finish("failed", error=error_object(exc))
    else:
        job.finish("succeeded", result=result)


def queue_position(service: Img2ImgService, prompt_id: str):
    """0 = running, n = n-th pending in its backend's ComfyUI queue, None = not in it."""
    client = service.active.prompt_of(prompt_id) or service.client  # the job's backend
    try:
        queue = client.get_queue()
    except ComfyError:
        return None
    if any(item[1] == prompt_id for item in queue.get("queue_running") or []):
        return 0
    pending = sorted(queue.get("queue_pending") or [], key=lambda item: item[0])
    for position, item in enumerate(pending, start=1):
        if item[1] == prompt_id:
            return position
    return None


#: How many ids of forgotten jobs still answer 404 job_expired (older ones: job_not_found). An id
#: costs about 100 bytes, so the memory stays bounded (about 1 MB) whatever the traffic.
EXPIRED_IDS_REMEMBERED = 10_000


class JobStore:
    """Runs jobs on a bounded pool and forgets finished ones after ``ttl_s`` or beyond ``max_kept``."""

    def __init__(self, service: Img2ImgService, *, workers: int = 32, ttl_s: float = 3600.0,
                 max_kept: int = 500, max_unfinished: int = 100):
        self.service = service
        self.ttl_s, self.max_kept, self.max_unfinished = ttl_s, max_kept, max_unfinished
        self.cancel_wait_s = 2.0  # how long a cancel request waits for the job to end
        self._jobs: OrderedDict = OrderedDict()
        self._expired: deque = deque(maxlen=EXPIRED_IDS_REMEMBERED)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="img2img-job")

    def submit(self, prepared: Prepared) -> Job:
        job = Job(uuid.uuid4().hex)
        job.position_of = self._queue_position
        with self._lock:
            self._prune()
            unfinished = sum(1 for j in self._jobs.values() if j.finished_at is None)
            if unfinished >= self.max_unfinished:  # each holds its inputs in memory until it ends
                raise Busy(f"{unfinished} jobs are already queued or running (IMG2IMG_JOBS_UNFINISHED): try "
                           "again once some have ended", retry_after=5)
        self.service.active.start(job.id)  # so a cancel before the worker starts is not lost
        with self._lock:
            self._jobs[job.id] = job
        job._emit("queued", {"position": None, "prompt_id": None})
        self._pool.submit(self._run, job, prepared)
        return job

    def _run(self, job: Job, prepared: Prepared) -> None:
        try:
            run_job(self.service, job, prepared, lambda: job.cancel_requested)
        finally:
            self.service.active.finish(job.id)

    def get(self, job_id: str) -> Job:
        with self._lock:
            self._prune()
            job = self._jobs.get(job_id)
            expired = job is None and job_id in self._expired
        if job is None:
            if expired:
                raise ApiError(f"Job {job_id} finished and has expired (finished jobs are kept "
                               f"{self.ttl_s:g} s, at most {self.max_kept})", code="job_expired", status=404)
            raise ApiError(f"No job {job_id!r}", code="job_not_found", status=404)
        return job

    def cancel(self, job_id: str, *, wait: bool = True) -> Job:
        """Cancel a job: idempotent; a finished job is left as it is. Waits briefly for the job to
        end, so the answer usually says "cancelled"."""
        job = self.get(job_id)
        if self._mark_cancelled(job):
            self._deliver_cancel(job)
        # The worker ends the job once its inputs are cleaned up; usually that is at once.
        if wait:
            job.wait_finished(self.cancel_wait_s)
        return job

    def _mark_cancelled(self, job: Job) -> bool:
        """True if the job was live and not yet asked to stop: it is now (no I/O)."""
        with job.changed:
            if job.status in TERMINAL or job.cancel_requested:
                return False
            job.cancel_requested = True
        self.service.active.cancel(job.id)  # a job not started yet never will be
        return True

    def _deliver_cancel(self, job: Job) -> None:
        """Cancel the job's run on ComfyUI; ComfyUI unreachable: the job is left as it was."""
        try:
            prompt_id, outcome = self.service.cancel_run(job.id)
        except BaseException:
            with job.changed:
                job.cancel_requested = False  # not delivered (ComfyUI unreachable): a retry tries again
            raise
        if prompt_id is not None:
            job.cancelled_prompt = {prompt_id: outcome}
        log.info("job %s cancel: %s", job.id, outcome)

    def cancel_all(self) -> list:
        """Cancel every unfinished job; returns them. A job whose ComfyUI cannot be reached is
        left as it was, and the first such error raised once the others are cancelled."""
        with self._lock:
            live = [j for j in self._jobs.values() if j.finished_at is None]
        # first all marked (no I/O): a worker freed meanwhile takes none of them for a fresh run
        marked = [job for job in live if self._mark_cancelled(job)]
        cancelled, failed = [], None

        def cancel(job):
            try:
                self._deliver_cancel(job)
                return job, None
            except ComfyError as exc:
                return None, exc
        active = self.service.active
        for job, exc in cancel_each(cancel, marked, backend_of=lambda job: active.client_of(job.id),
                                    prompt_of=lambda job: active.prompt_id_of(job.id)):
            if exc is None:
                cancelled.append(job)
            failed = failed or exc
        if failed is not None:
            raise failed
        delivered = set(cancelled)  # and those asked to stop before: cancelled all the same
        return [job for job in live if job in delivered or (job not in marked and job.cancel_requested)]

    def _queue_position(self, prompt_id: str):
        return queue_position(self.service, prompt_id)

    def _prune(self) -> None:
        now = time.monotonic()
        finished = [j for j in self._jobs.values() if j.finished_at is not None]
        excess = len(finished) - self.max_kept
        for job in finished:
            if excess > 0 or now - job.finished_at > self.ttl_s:
                del self._jobs[job.id]
                self._expired.append(job.id)
                excess -= 1

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def sse(job: Job, *, last_event_id: int = 0, heartbeat_s: float = 15.0):
    """The job's events as Server-Sent Events: past ones first, then live ones, until it ends."""
    last = last_event_id
    try:
        while True:
            events, finished = job.events_after(last, heartbeat_s)
            if not events and not finished:
                yield ": keep-alive\n\n"
                continue
            for event_id, kind, data in events:
                last = event_id
                yield f"id: {event_id}\nevent: {kind}\ndata: {json.dumps(data)}\n\n"
                if kind in FINAL_EVENT.values():
                    return
            if finished and not events:
                return
    finally:
        job.close()
