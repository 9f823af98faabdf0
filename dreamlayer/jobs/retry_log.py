"""RQ's "could not connect to Redis" lines, summarised.

While Redis is away every RQ worker logs each of its retries at ERROR — its command channel every
2 s, its wait for a job with a growing back-off — so a replica with 3 queue workers wrote about
4 lines a second through an outage (a chaos run: 1,023 in 4.5 minutes), burying everything else.
Its queue workers, which RQ stops after a few failed retries, are restarted every few seconds,
each saying so. The service answers 503 ``queue_unavailable`` meanwhile and recovers by itself, so
one WARNING when the retries start, then one a minute with how many were left out, says all there
is.
"""
from __future__ import annotations

import logging
import threading
import time

#: RQ's worker logger, whose retry lines this filters, and ours, whose queue workers restart
#: every few seconds while Redis is away (worker.QueueWorkers._work).
LOGGERS = ("rq.worker", "dreamlayer.jobs.worker")
#: What RQ 3.0's retry lines say (its pubsub exception handler and its dequeue loop), and ours.
RETRY_TEXT = "could not connect to redis"
#: One line at most this often while the retries go on...
SUMMARY_EVERY_S = 60.0
#: ...and retries this far apart are two outages: longer than RQ's longest wait between two
#: retries (max_connection_wait_time, 60 s).
NEW_OUTAGE_AFTER_S = 90.0


class RedisRetryLog(logging.Filter):
    """Lets the first retry line of an outage through, and then one a minute, as WARNINGs."""

    def __init__(self, clock=time.monotonic):
        super().__init__()
        self._clock = clock
        self._lock = threading.Lock()
        self._last_seen = None  # the last retry line, shown or not
        self._last_shown = None
        self._left_out = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if RETRY_TEXT not in str(record.msg).lower():
            return True
        now = self._clock()
        with self._lock:
            new_outage = self._last_seen is None or now - self._last_seen > NEW_OUTAGE_AFTER_S
            self._last_seen = now
            if not new_outage and now - self._last_shown < SUMMARY_EVERY_S:
                self._left_out += 1
                return False
            left_out, self._left_out, self._last_shown = self._left_out, 0, now
        record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
        if not new_outage:
            record.msg = f"{record.msg} (still; {left_out} such line(s) left out)"
        elif left_out:
            record.msg = f"{record.msg} ({left_out} such line(s) of the last outage left out)"
        return True


_installed = RedisRetryLog()
_install_lock = threading.Lock()


def install() -> RedisRetryLog:
    """Filter RQ's worker logger and ours, with one shared count (once per process: its workers
    share the loggers)."""
    with _install_lock:
        for name in LOGGERS:
            logger = logging.getLogger(name)
            if _installed not in logger.filters:
                logger.addFilter(_installed)
    return _installed
