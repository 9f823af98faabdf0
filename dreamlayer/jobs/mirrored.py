"""The state of one run of a job, in this process and in the job's Redis record (REDIS_URL).

The in-memory state machine of the embedded store (store.Job) drives it; every change is written
through to the record (records.py) that every replica reads.
"""
from __future__ import annotations

import logging
import threading

from redis.exceptions import NoScriptError, TimeoutError as RedisTimeout

from dreamlayer.jobs.records import FIELDS, REDIS_DOWN, Records, patiently
from dreamlayer.jobs.store import Job, queue_position

log = logging.getLogger(__name__)

#: How long a job run at once waits for its record to be created before its first prompt (the
#: writer thread is normally done long before: it works while the inputs are staged).
CREATE_WAIT_S = 30.0


class Pending:
    """A write made by the writer thread that a job must see done before it goes on: the record
    of a job run at once is created while its inputs are staged, and must exist before its first
    prompt reaches ComfyUI (a replica killed from then on has the job run again elsewhere)."""

    def __init__(self):
        self.error: BaseException | None = None
        self._done = threading.Event()

    def run(self, write) -> None:
        try:
            write()
        except BaseException as exc:  # noqa: BLE001 - the waiting run raises it
            self.error = exc
        finally:
            self._done.set()

    def wait(self, timeout: float = CREATE_WAIT_S) -> None:
        """Return once done; raise what the write raised (a Redis error: 503 queue_unavailable)."""
        if not self._done.wait(timeout):
            self.error = RedisTimeout(f"the job's record was not written within {timeout:g}s")
        if self.error is not None:
            raise self.error


class MirroredJob(Job):
    """The in-memory job state machine (store.Job) of the worker running it, written through to
    the job's Redis record after every change: at once, or (``later``, a job run at once for a
    synchronous request) by a writer thread, in order, so that its run does not wait for them;
    its end always at once (when the caller has its answer, the job reads as finished)."""

    def __init__(self, job_id: str, records: Records, service, *, quiet: bool = False, attempt: str | None = None,
                 later=None, created: Pending | None = None):
        super().__init__(job_id)
        self.created = created  # the record's creation, when the writer thread makes it (run at once)
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
            if finished and self.created is not None:
                try:
                    self.created.wait()
                except Exception:  # noqa: BLE001 - no record to end: its caller raises the error
                    return
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

    def retrying(self, reason: str) -> None:
        super().retrying(reason)
        self._flush()

    def before_prompt(self, index: int) -> None:
        if self.created is not None:
            self.created.wait()

    def progress(self, event) -> None:
        super().progress(event)
        if not self.quiet:
            self._flush()

    def finish(self, status, *, result=None, error=None) -> None:
        super().finish(status, result=result, error=error)
        self._flush(finished=True)
