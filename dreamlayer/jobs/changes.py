"""Wake-ups for readers of job records: one Redis subscription per process, not one per request.

Every change to a job record is published on the job's channel (records.py). A process that has
readers waiting (a synchronous request, an SSE stream, a cancel) listens to all job channels with
one PSUBSCRIBE on one thread and wakes the readers of the job that changed. A waiting request
therefore costs no connection and no SUBSCRIBE round trip of its own. Readers never trust a
wake-up alone: they re-read the record, and re-read it at least every ``POLL_S`` whatever
happens, so a message lost while the subscription reconnects only delays them.
"""
from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager

import redis

log = logging.getLogger(__name__)

#: A reader re-reads the record at least this often (a safety net; changes wake it at once).
POLL_S = 1.0


class Changes:
    def __init__(self, client: redis.Redis, pattern: str):
        self.redis = client
        self.pattern = pattern
        self._lock = threading.Lock()
        self._seq: dict = {}      # channel -> changes seen while someone watches it
        self._watchers: dict = {}  # channel -> number of readers watching it
        # channel -> its readers' condition: a change wakes only the readers of its job (one
        # shared condition woke every waiting request at every change of any job)
        self._conds: dict = {}
        self._thread = None
        self._stop = threading.Event()

    @contextmanager
    def watch(self, channel: str):
        """While inside, changes of ``channel`` are counted; see ``seq`` and ``wait``."""
        self._ensure_listening()
        with self._lock:
            self._watchers[channel] = self._watchers.get(channel, 0) + 1
            self._seq.setdefault(channel, 0)
            self._conds.setdefault(channel, threading.Condition(self._lock))
        try:
            yield channel
        finally:
            with self._lock:
                self._watchers[channel] -= 1
                if not self._watchers[channel]:
                    del self._watchers[channel]
                    del self._seq[channel]
                    del self._conds[channel]

    def seq(self, channel: str) -> int:
        with self._lock:
            return self._seq.get(channel, 0)

    def wait(self, channel: str, seen: int, deadline: float) -> None:
        """Until ``channel`` changed after ``seen`` (a value of ``seq``), ``deadline``, or
        POLL_S, whichever comes first."""
        until = min(deadline, time.monotonic() + POLL_S)
        with self._lock:
            cond = self._conds.get(channel)  # None: not watched (wait is called inside watch)
            while cond is not None and self._seq.get(channel, 0) == seen:
                left = until - time.monotonic()
                if left <= 0:
                    return
                cond.wait(left)

    # -- the listening thread ------------------------------------------------------------------
    def _ensure_listening(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._listen, name="img2img-job-changes", daemon=True)
                    self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            pubsub = None
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.psubscribe(self.pattern)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    channel = message["channel"].decode()
                    with self._lock:
                        if channel in self._seq:
                            self._seq[channel] += 1
                            self._conds[channel].notify_all()
            except Exception as exc:  # noqa: BLE001 - Redis down or restarting: this thread must not die
                log.debug("job change subscription lost (%s); subscribing again", exc)
                self._stop.wait(0.2)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:  # noqa: BLE001 - closing a broken connection
                        pass

    def close(self) -> None:
        self._stop.set()
