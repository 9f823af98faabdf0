"""RQ's retry lines while Redis is away are summarised (dreamlayer/jobs/retry_log.py)."""
from __future__ import annotations

import logging

from dreamlayer.jobs.retry_log import NEW_OUTAGE_AFTER_S, SUMMARY_EVERY_S, RedisRetryLog, install

RQ_LINE = "Worker %s: could not connect to Redis instance: %s retrying in %d seconds..."


def _record(msg=RQ_LINE, args=("w1", "Error 111 connecting to 127.0.0.1:6379. Connection refused.", 2)):
    return logging.LogRecord("rq.worker", logging.ERROR, __file__, 1, msg, args, None)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_one_warning_when_the_retries_start_then_one_a_minute_with_what_was_left_out():
    clock = Clock()
    log = RedisRetryLog(clock)
    first = _record()
    assert log.filter(first) and first.levelno == logging.WARNING and first.levelname == "WARNING"
    assert "Connection refused" in first.getMessage()
    shown = []
    for _ in range(int(SUMMARY_EVERY_S // 2) + 1):  # 4 workers' lines every 2 s for a minute
        clock.now += 2
        for worker in range(4):
            record = _record(args=(f"w{worker}", "refused", 2))
            if log.filter(record):
                shown.append(record)
    assert len(shown) == 1 and shown[0].levelno == logging.WARNING
    # shown at the minute, by the first worker of that round: the 29 rounds before it were left out
    assert f"(still; {4 * (int(SUMMARY_EVERY_S // 2) - 1)} such line(s) left out)" in shown[0].getMessage()


def test_retries_far_apart_are_a_new_outage_and_other_lines_pass_untouched():
    clock = Clock()
    log = RedisRetryLog(clock)
    assert log.filter(_record())
    clock.now += 5
    assert not log.filter(_record())
    clock.now += NEW_OUTAGE_AFTER_S + 1  # Redis came back, and went away again
    again = _record()
    assert log.filter(again) and "(1 such line(s) of the last outage left out)" in again.getMessage()
    other = _record("Worker %s: found an unhandled exception, quitting...", ("w1",))
    assert log.filter(other) and other.levelno == logging.ERROR and other.msg.endswith("quitting...")


def test_the_queue_workers_own_restarts_count_with_rqs_lines_and_both_loggers_are_filtered():
    """While Redis is away RQ stops a worker after a few retries and the service restarts it
    every few seconds, saying so: those lines are summarised with RQ's, in one count."""
    clock = Clock()
    log = RedisRetryLog(clock)
    ours = logging.LogRecord("dreamlayer.jobs.worker", logging.WARNING, __file__, 1,
                             "queue worker stopped: could not connect to Redis (%s); restarting in %.1fs",
                             ("Error 111 connecting to 127.0.0.1:6379. Connection refused.", 5.0), None)
    assert log.filter(_record())
    clock.now += 5
    assert not log.filter(ours)
    installed = install()
    assert all(installed in logging.getLogger(name).filters for name in ("rq.worker", "dreamlayer.jobs.worker"))
