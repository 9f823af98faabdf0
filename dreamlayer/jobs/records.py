"""A job as a record in Redis, so that every replica answers for every job.

One hash per job holds its status snapshot (each field JSON), one list its events in order (an
event's id is its position, 1-based, as the SSE ``id:`` field), and every change is announced on a
channel named after the job, so waiting readers wake at once. A finished job's keys expire after
the job TTL; a small marker remembers for a week that the id existed (404 ``job_expired`` instead
of ``job_not_found``). Unfinished jobs are listed in one set, for /api/img2img/interrupt.
"""
from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from urllib.parse import urlsplit

import redis

from dreamlayer.errors import ApiError

log = logging.getLogger(__name__)

PREFIX = "dreamlayer:img2img:"
TERMINAL = ("succeeded", "failed", "cancelled")
#: How long an expired job's id is remembered (404 job_expired rather than job_not_found).
EXPIRED_MARKER_S = 7 * 24 * 3600
#: An unfinished record outlives anything that could still finish it (a lost record expires).
UNFINISHED_TTL_S = 7 * 24 * 3600
#: The fields of a snapshot, in the order the status answer lists them.
FIELDS = ("status", "prompt_id", "queue_position", "progress", "result", "error")


def connect(url: str, *, socket_timeout: float = 5.0) -> redis.Redis:
    """A client that fails fast when Redis is down (connection refused at once, an unreachable
    host after 1 s) instead of hanging a request."""
    return redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=socket_timeout,
                                health_check_interval=30)


def describe(url: str) -> str:
    """The Redis address without its password, for messages and /health."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix://{parts.path}"
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path or ''}"


#: What a lost or unreachable Redis raises.
REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
#: How long a worker keeps trying to write what cannot be redone cheaply (a finished job's end, its
#: images) while Redis is away, before giving up (the job is then run again once Redis is back).
PATIENCE_S = 60.0


def patiently(write, *, what: str, patience_s: float | None = None):
    """Run ``write`` until Redis takes it, for up to PATIENCE_S: a finished generation is not
    thrown away for a Redis restart of a few seconds."""
    deadline = time.monotonic() + (PATIENCE_S if patience_s is None else patience_s)
    delay, warned = 0.1, False
    while True:
        try:
            return write()
        except REDIS_DOWN as exc:
            if time.monotonic() + delay > deadline:
                raise
            if not warned:
                warned = True
                log.warning("Redis is away (%s); retrying %s", exc, what)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


class QueueUnavailable(ApiError):
    status = 503
    code = "queue_unavailable"


@contextmanager
def queue_errors(url: str):
    """Redis connection failures become 503 queue_unavailable (the client may retry)."""
    try:
        yield
    except REDIS_DOWN as exc:
        raise QueueUnavailable(f"The job queue (Redis at {describe(url)}) is not reachable: {exc}; "
                               "retry in a moment") from None


#: Records.write: KEYS = hash, events, expired marker, live set, channel, inputs; ARGV = finished, ttl (ms),
#: marker ttl (ms), job id, the attempt the writer must be ('' = any), number of fields, field/value
#: pairs, then the events. Readers are woken (PUBLISH) only by new events or the end.
_WRITE = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status or status == '"succeeded"' or status == '"failed"' or status == '"cancelled"' then
  return 0
end
if ARGV[5] ~= '' and redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[5] then
  return 0
end
local n = tonumber(ARGV[6])
for j = 0, n - 1 do
  redis.call('HSET', KEYS[1], ARGV[7 + 2 * j], ARGV[8 + 2 * j])
end
for j = 7 + 2 * n, #ARGV do
  redis.call('RPUSH', KEYS[2], ARGV[j])
end
if ARGV[1] == '1' then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[3])
  redis.call('SREM', KEYS[4], ARGV[4])
  redis.call('DEL', KEYS[6])
end
if ARGV[1] == '1' or #ARGV >= 7 + 2 * n then
  redis.call('PUBLISH', KEYS[5], '1')  -- readers wait for events or the end, nothing else
end
return 1
"""


#: Records.claim: KEYS = hash, inputs; ARGV = the attempt (JSON). Returns {record as HGETALL,
#: inputs, 1 if claimed}: a job not finished, with its inputs, is claimed by this attempt.
_CLAIM = """
local record = redis.call('HGETALL', KEYS[1])
local inputs = redis.call('GET', KEYS[2])
local status = redis.call('HGET', KEYS[1], 'status')
if not status or not inputs or status == '"succeeded"' or status == '"failed"' or status == '"cancelled"' then
  return {record, '', 0}
end
redis.call('HSET', KEYS[1], 'attempt', ARGV[1])
return {record, inputs, 1}
"""


class Records:
    def __init__(self, client: redis.Redis, ttl_s: float, prefix: str = PREFIX):
        self.redis = client
        self._write = client.register_script(_WRITE)
        self._claim = client.register_script(_CLAIM)
        self.ttl_s = ttl_s
        self.prefix = prefix
        self.live_key = f"{prefix}live"
        self.control_channel = f"{prefix}control"

    def key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def events_key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}:events"

    def channel(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def _expired_key(self, job_id: str) -> str:
        return f"{self.prefix}expired:{job_id}"

    # -- writing -------------------------------------------------------------------------------
    def inputs_key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}:inputs"

    def create(self, job_id: str, pipe, inputs: bytes, *, attempt: str | None = None) -> None:
        """A new queued job, as the embedded store starts one (its first event: queued), and its
        inputs (kept until it finishes, so that a job run again still has them). ``attempt``: the
        run that claims it from the start (a job started at once, QueueWorkers.run_here)."""
        pipe.set(self.inputs_key(job_id), inputs, px=UNFINISHED_TTL_S * 1000)
        snapshot = {"status": "queued", "prompt_id": None, "queue_position": None,
                    "progress": {"value": None, "max": None, "node": None}, "result": None, "error": None}
        if attempt is not None:
            snapshot["attempt"] = attempt
        pipe.hset(self.key(job_id), mapping={k: json.dumps(v) for k, v in snapshot.items()})
        pipe.rpush(self.events_key(job_id), json.dumps(["queued", {"type": "queued", "position": None,
                                                                   "prompt_id": None}]))
        pipe.expire(self.key(job_id), UNFINISHED_TTL_S)
        pipe.expire(self.events_key(job_id), UNFINISHED_TTL_S)
        pipe.sadd(self.live_key, job_id)

    def write(self, job_id: str, fields: dict, events: list, *, finished: bool = False,
              attempt: str | None = None) -> bool:
        """Update the snapshot and append events atomically, in one round trip (a Lua script); a
        finished record gets its TTL. Never changes a record that already finished, or that has
        expired, or (``attempt``) whose "attempt" field names another run (returns False then)."""
        return bool(self._write(**self._write_call(job_id, fields, events, finished, attempt)))

    def queue_write(self, pipe, job_id: str, fields: dict, events: list, *, finished: bool = False,
                    attempt: str | None = None) -> None:
        """write() queued on ``pipe``, with other commands in the same round trip (its result is
        the pipeline's, truthy when written). By the script's hash alone (a Script on a pipeline
        costs a round trip of its own, SCRIPT EXISTS, every time): a Redis that lost its scripts
        (restarted) fails the pipeline with NoScriptError, after load_script() it goes through."""
        call = self._write_call(job_id, fields, events, finished, attempt)
        pipe.evalsha(self._write.sha, len(call["keys"]), *call["keys"], *call["args"])

    def load_script(self) -> None:
        self.redis.script_load(_WRITE)

    def _write_call(self, job_id, fields, events, finished, attempt) -> dict:
        args = [1 if finished else 0, max(1, int(self.ttl_s * 1000)), int((self.ttl_s + EXPIRED_MARKER_S) * 1000),
                job_id, json.dumps(attempt) if attempt else "", len(fields)]
        for name, value in fields.items():
            args += [name, json.dumps(value)]
        args += [json.dumps([kind, data]) for kind, data in events]
        keys = [self.key(job_id), self.events_key(job_id), self._expired_key(job_id), self.live_key,
                self.channel(job_id), self.inputs_key(job_id)]
        return {"keys": keys, "args": args}

    def claim(self, job_id: str, attempt: str) -> tuple:
        """(record, inputs) of a job to run, read and claimed for ``attempt`` in one round trip
        (from then on only that run writes the record: a run that lost its lease but still runs,
        its process paused or Redis away too long, cannot spoil the next run's end); inputs are
        None, and nothing is claimed, when the job has finished or expired meanwhile."""
        raw, inputs, claimed = self._claim(keys=[self.key(job_id), self.inputs_key(job_id)],
                                           args=[json.dumps(attempt)])
        record = self.decode(dict(zip(raw[::2], raw[1::2])))
        return record, (inputs if claimed else None)

    def request_cancel(self, job_id: str) -> bool:
        """Mark the job cancelled by its owner; False if it had finished or was marked before."""
        key = self.key(job_id)
        with self.redis.pipeline() as pipe:
            pipe.hget(key, "status")
            pipe.hsetnx(key, "cancel_requested", "true")
            status, fresh = pipe.execute()
        if status is None or json.loads(status) in TERMINAL:
            return False
        return bool(fresh)

    def announce(self, message: dict) -> None:
        """Tell every worker (cancel one job, or interrupt all)."""
        self.redis.publish(self.control_channel, json.dumps(message))

    # -- reading -------------------------------------------------------------------------------
    def load(self, job_id: str) -> dict | None:
        """Every field of the record (decoded), or None when there is no such record."""
        return self.decode(self.redis.hgetall(self.key(job_id)))

    @staticmethod
    def decode(raw: dict) -> dict | None:
        if not raw:
            return None
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    def snapshot(self, job_id: str, record: dict | None = None) -> dict | None:
        record = record if record is not None else self.load(job_id)
        if record is None:
            return None
        return {"job_id": job_id, **{name: record.get(name) for name in FIELDS}}

    def existed(self, job_id: str) -> bool:
        return bool(self.redis.exists(self._expired_key(job_id)))

    def events_and_status(self, job_id: str, after: int) -> tuple:
        """(events with an id above ``after``, status), read at one instant (MULTI): a job that
        finishes in between cannot look finished without its final event."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.lrange(self.events_key(job_id), after, -1)
            pipe.hget(self.key(job_id), "status")
            raw, status = pipe.execute()
        return self._events(raw, after), None if status is None else json.loads(status)

    @staticmethod
    def _events(raw: list, after: int) -> list:
        out = []
        for offset, item in enumerate(raw, start=after + 1):
            kind, data = json.loads(item)
            out.append((offset, kind, data))
        return out

    def status(self, job_id: str) -> str | None:
        raw = self.redis.hget(self.key(job_id), "status")
        return None if raw is None else json.loads(raw)

    def cancel_requested(self, job_id: str) -> bool:
        return self.redis.hexists(self.key(job_id), "cancel_requested")

    def live(self) -> list:
        return sorted(m.decode() for m in self.redis.smembers(self.live_key))
