"""Scale-out (issue 16): REDIS_URL, two replicas as separate processes, several ComfyUI backends.

Everything is real: a redis-server per test (redis_fixtures), fake ComfyUI backends on loopback
(threads of this process), and each replica is ``python img2img_server.py`` in a process of its
own (the Replica class below), configured only through its environment as in production. The
replicas share nothing but Redis and the backends: no COMFYUI_DIR, so inputs go over HTTP and
results come back over GET /view, and each replica has its own served-images folder (a served
image must come from Redis to be readable from the other replica).

Tests wait on conditions (waiting.wait_until), never for a fixed time.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from dreamlayer.comfyui.fake import FakeComfyUI
from dreamlayer.config.env import VARIABLES
from dreamlayer.config.img2img import HTTP_UPLOAD_SUBFOLDER
from dreamlayer.img2img.temp_uploads import PLACEHOLDER
from images import box_mask, gradient, png
from waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
PARAMS = {"prompt": "a lighthouse at dusk", "steps": 3, "seed": 11, "denoising_strength": 0.6}
TERMINAL = ("succeeded", "failed", "cancelled")
LEASE_S = 2


# --- the backends -----------------------------------------------------------------------------

@pytest.fixture
def backend_b(second_comfy):
    return second_comfy


@pytest.fixture
def backends(fake_comfy, backend_b):
    """Two fake ComfyUI servers, A (fake_comfy) and B."""
    return fake_comfy, backend_b


class InFlight:
    """How many of our prompts one fake backend held at most — pending, or running and not yet
    executed — counted at the moment each new prompt is queued on it, the new one included. A
    prompt that has sent execution_success does not count: the backend is free for the next job
    then (ComfyUI only files its history, 0.1-0.3 ms on a real 0.3.40, history_delay in the fake),
    and a prompt queued meanwhile waits in ComfyUI's queue for that moment, never runs beside it."""

    def __init__(self, fake: FakeComfyUI):
        self.most = 0
        queue, put, executor = fake.queue, fake.queue.put, fake.executor

        def counting_put(item):
            with queue.mutex:
                held = queue.get_tasks_remaining()
                executed = executor.executed_prompt_id
                if executed is not None and any(p[1] == executed for p in queue.currently_running.values()):
                    held -= 1
                self.most = max(self.most, held + 1)
                put(item)
        queue.put = counting_put


# --- the replicas -------------------------------------------------------------------------------

def clean_environ() -> dict:
    """This process's environment without any DreamLayer setting (or proxy) of the machine."""
    names = {v.name for v in VARIABLES} | {old for v in VARIABLES for old in v.deprecated}
    env = {k: v for k, v in os.environ.items()
           if k not in names and k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONFAULTHANDLER"] = "1"  # a replica that hangs can be made to say where (Replica.stop)
    return env


class Replica:
    """One ``python img2img_server.py`` process. Its output goes to a log file, shown when a test
    fails (the fixture prints it at teardown; pytest shows a failed test's captured output)."""

    def __init__(self, name: str, folder: Path, env: dict, port: int | None, role: str, redis_url: str):
        self.name, self.folder, self.env, self.port, self.role = name, folder, env, port, role
        self.redis_url = redis_url
        self.url = f"http://127.0.0.1:{port}" if port else None
        self.log_path = folder / "replica.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Replica":
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "img2img_server.py")], env=self.env,
                                         cwd=self.folder, stdout=log, stderr=subprocess.STDOUT)
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"replica {self.name} exited with {self.proc.returncode}:\n{self.log()[-4000:]}")

    def health(self) -> dict | None:
        self.check_alive()
        try:
            resp = requests.get(f"{self.url}/health", timeout=5)
        except requests.ConnectionError:
            return None
        return resp.json() if resp.ok else None

    def queue_workers(self) -> int:
        """This process's queue workers registered in Redis (RQ keeps each worker's pid)."""
        from redis import Redis
        from rq import Worker

        self.check_alive()
        with Redis.from_url(self.redis_url, socket_timeout=5) as connection:
            return sum(1 for w in Worker.all(connection=connection) if w.pid == self.pid)

    def wait_ready(self, workers: int) -> "Replica":
        if self.role != "worker":
            wait_until(lambda: (h := self.health()) and h["queue"]["reachable"],
                       what=f"replica {self.name} to answer /health")
        if self.role != "api":
            wait_until(lambda: self.queue_workers() == workers, what=f"replica {self.name}'s {workers} queue workers")
        return self

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind, as when a machine or container dies."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        """SIGTERM, then wait for the process to end (SIGKILL if it will not)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            # SIGABRT: faulthandler (PYTHONFAULTHANDLER, set for every replica) writes every
            # thread's stack to the log before the process ends, so the failure says where it hung
            self.proc.send_signal(signal.SIGABRT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
            raise AssertionError(f"replica {self.name} ignored SIGTERM for 30 s:\n{self.log()[-12000:]}")


class Replicas:
    """Starts replicas that share one Redis and the given backends; stops them all at the end."""

    def __init__(self, folder: Path, redis_url: str, backend_urls: tuple, reserve_port):
        self.folder, self.redis_url, self.backend_urls = folder, redis_url, backend_urls
        self.reserve_port = reserve_port
        self.started: list = []

    def start(self, role: str = "both", *, ready: bool = True, **extra) -> Replica:
        """A replica with this IMG2IMG_ROLE (and any other settings), ready: /health answers and
        its queue workers are registered (ready=False: only started)."""
        name = f"{role}-{len(self.started) + 1}"
        folder = self.folder / name
        port = self.reserve_port()
        urls = self.backend_urls
        env = dict(clean_environ(), REDIS_URL=self.redis_url, COMFY_API_URL=",".join(urls),
                   IMG2IMG_ROLE=role, IMG2IMG_PORT=str(port), IMG2IMG_JOB_LEASE_S=str(LEASE_S),
                   COMFY_TIMEOUT_S="20", SERVED_IMAGES_DIR=str(folder / "served"),
                   DREAMLAYER_SETTINGS_FILE=str(folder / "settings.json"),
                   PUBLIC_BASE_URL=f"http://127.0.0.1:{port}", LOG_LEVEL="INFO")
        env.update({k: str(v) for k, v in extra.items()})  # e.g. a SERVED_IMAGES_DIR shared by replicas
        replica = Replica(name, folder, env, port if role != "worker" else None, role, self.redis_url)
        self.started.append(replica)
        replica.start()
        if not ready:
            return replica
        # the default: one queue worker per backend slot (COMFY_PROMPTS_PER_BACKEND (1) x backends)
        # plus a spare
        return replica.wait_ready(workers=int(extra.get("IMG2IMG_QUEUE_WORKERS", len(urls) + 1)))

    def stop_all(self) -> None:
        errors = []
        for replica in self.started:
            try:
                replica.stop()
            except AssertionError as exc:
                errors.append(str(exc))
        assert not errors, "\n".join(errors)


@contextmanager
def replica_group(folder, redis_url: str, urls: tuple, reserve_port):
    """Replicas that are all stopped at the end, their logs printed (shown only when the test failed)."""
    group = Replicas(folder, redis_url, urls, reserve_port)
    try:
        yield group
    finally:
        try:
            group.stop_all()
        finally:
            for replica in group.started:
                print(f"\n===== replica {replica.name} (pid {replica.proc.pid}, exit {replica.proc.returncode})"
                      f" =====\n{replica.log()[-20000:]}")


@pytest.fixture
def replicas(tmp_path, redis_server, backends, reserve_port):
    with replica_group(tmp_path / "replicas", redis_server.url, tuple(b.url for b in backends), reserve_port) as group:
        yield group


# --- talking to the service --------------------------------------------------------------------

def submit(replica: Replica, params=None, *, sync=False, seed=None):
    params = {**PARAMS, **(params or {})}
    if seed is not None:
        params["seed"] = seed
    if not sync:
        params["async"] = True
    return requests.post(f"{replica.url}/api/img2img", files={"image": ("i.png", png(gradient(32, 32)))},
                         data={"params": json.dumps(params)}, timeout=60)


def accepted(resp) -> str:
    assert resp.status_code == 202, resp.text
    return resp.json()["job_id"]


def running_masked_job(api: Replica) -> str:
    """An async job with a mask (two staged inputs), once it has made progress on its backend."""
    mask = box_mask((32, 32), (8, 8, 24, 24))
    resp = requests.post(f"{api.url}/api/img2img", data={"params": json.dumps({**PARAMS, "steps": 30, "async": True})},
                         files={"image": ("i.png", png(gradient(32, 32))), "mask": ("m.png", png(mask))}, timeout=60)
    job = accepted(resp)
    wait_status(api, job, lambda s: (s["progress"]["value"] or 0) >= 1, "the job to make progress")
    return job


def status(replica: Replica, job_id: str) -> dict:
    resp = requests.get(f"{replica.url}/api/img2img/jobs/{job_id}", timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()


def wait_status(replica: Replica, job_id: str, predicate, what: str) -> dict:
    seen = []

    def check():
        seen[:] = [status(replica, job_id)]
        return seen[0] if predicate(seen[0]) else None
    try:
        return wait_until(check, what=f"{what} (job {job_id}, asked {replica.name})")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; its last status: {seen}") from None


def finished(replica: Replica, job_id: str) -> dict:
    return wait_status(replica, job_id, lambda s: s["status"] in TERMINAL, "the job to finish")


def cancel(replica: Replica, job_id: str) -> dict:
    resp = requests.post(f"{replica.url}/api/img2img/jobs/{job_id}/cancel", timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()


def events(replica: Replica, job_id: str, *, last_event_id=None):
    """The job's SSE stream from ``replica`` as (id, kind, data), read to its end."""
    headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
    out, event_id, kind = [], None, None
    with requests.get(f"{replica.url}/api/img2img/jobs/{job_id}/events", headers=headers, stream=True,
                      timeout=30) as resp:
        assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/event-stream"), resp.text
        for line in resp.iter_lines(decode_unicode=True):
            if line.startswith("id: "):
                event_id = int(line[4:])
            elif line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                out.append((event_id, kind, json.loads(line[6:])))
    return out


def image_names(result: dict) -> list:
    return [img["url"].rsplit("/", 1)[-1] for img in result["comfy_response"]["generated_images"]]


def image(replica: Replica, name: str) -> bytes:
    resp = requests.get(f"{replica.url}/api/images/{name}", timeout=10)
    assert resp.status_code == 200, f"{replica.name}: {resp.status_code} {resp.text[:300]}"
    assert resp.headers["Content-Type"] == "image/png" and resp.content.startswith(b"\x89PNG")
    return resp.content


def prompt_ids(fake: FakeComfyUI) -> list:
    return [p[0] for p in fake.prompts]


def running_on(fakes, job: dict):
    """The fake backend whose running prompt is the job's, or None."""
    for fake in fakes:
        if job["prompt_id"] and fake.running_prompt_id() == job["prompt_id"]:
            return fake
    return None


# --- 1. distribution ----------------------------------------------------------------------------

def test_jobs_spread_over_both_backends_and_wait_in_the_service_not_on_a_busy_backend(replicas, backends):
    """Two replicas, two backends, one prompt per backend at a time across both replicas: with
    both backends busy a third job waits in the queue (on no backend); when one backend frees up
    the third runs there at once."""
    a, b = backends
    r1, r2 = replicas.start(), replicas.start()
    a.hang_next()
    b.hang_next()
    first = accepted(submit(r1, seed=1))
    second = accepted(submit(r2, seed=2))
    wait_until(lambda: a.running_prompt_id() and b.running_prompt_id(), what="one job on each backend")
    third = accepted(submit(r2, seed=3))
    jobs = {job: wait_status(r1, job, lambda s: s["status"] == "running", "the job to run")
            for job in (first, second)}
    on = {job: running_on(backends, snap) for job, snap in jobs.items()}
    assert {on[first], on[second]} == {a, b}, "each backend runs one of the two jobs"
    snap = status(r1, third)
    assert snap["status"] == "queued" and snap["prompt_id"] is None, snap
    # in RQ's queue, or taken ahead (started, not on ComfyUI) by a replica that runs both jobs;
    # waited for: a worker taking it ahead has it in neither for a moment (RQ's pop, then its start)
    wait_until(lambda: r1.health()["queue"]["queued"] == 1, what="/health to count the third job as queued")
    assert len(a.prompts) == 1 and len(b.prompts) == 1, "the third job waits in the service"

    # free the backend of the first job (cancelled from the other replica): the third runs there
    freed = on[first]
    assert cancel(r2, first)["status"] == "cancelled"
    done = finished(r1, third)
    assert done["status"] == "succeeded", done
    assert done["prompt_id"] in prompt_ids(freed) and len(freed.prompts) == 2
    other = on[second]
    assert other.running_prompt_id() == jobs[second]["prompt_id"], "the second job still runs"
    assert cancel(r1, second)["status"] == "cancelled"

    # a burst through both replicas: every job succeeds, both backends work, never two at once
    # (counted from when the interrupted prompts have left ComfyUI's queue: the service counts a
    # prompt done when ComfyUI reports it interrupted, a moment before ComfyUI drops it)
    wait_until(lambda: a.running_prompt_id() is None and b.running_prompt_id() is None, what="idle backends")
    counters = [InFlight(a), InFlight(b)]
    a.step_delay = b.step_delay = 0.01
    before = len(a.prompts), len(b.prompts)
    burst = [(r, accepted(submit(r, seed=10 + i))) for i, r in enumerate([r1, r2] * 4)]
    for replica, job in burst:
        assert finished(replica, job)["status"] == "succeeded"
    assert len(a.prompts) - before[0] > 0 and len(b.prompts) - before[1] > 0, "both backends took work"
    assert len(a.prompts) + len(b.prompts) - sum(before) == len(burst)
    assert [c.most for c in counters] == [1, 1], "a backend held two of our prompts at once"


# --- 2. any replica answers for any job -----------------------------------------------------------

def test_events_status_and_images_of_a_job_from_either_replica(replicas, backends):
    """Submitted on one replica, followed on the other: the live SSE stream, its replay with
    Last-Event-ID, the status and the served image are the same from both."""
    a, b = backends
    a.step_delay = b.step_delay = 0.05
    r1, r2 = replicas.start(), replicas.start()
    job = accepted(submit(r1, {"steps": 6}))
    live = events(r2, job)  # opened at once: most of it arrives live, through Redis
    ids, kinds = [e[0] for e in live], [e[1] for e in live]
    assert ids == list(range(1, len(live) + 1))
    assert kinds[0] == "queued" and kinds[-1] == "done" and all(d["type"] == k for _, k, d in live)
    assert [d["value"] for _, k, d in live if k == "progress"] == [1, 2, 3, 4, 5, 6]
    result = live[-1][2]
    assert result["status"] == "success"

    assert events(r1, job) == live, "the replay from the other replica is the same stream"
    assert events(r1, job, last_event_id=len(live) - 1) == live[-1:]
    middle = len(live) // 2
    assert events(r2, job, last_event_id=middle) == live[middle:]
    assert events(r2, job, last_event_id=len(live)) == []  # nothing after the last one: the stream ends
    assert status(r1, job) == status(r2, job)
    snap = status(r2, job)
    assert snap["status"] == "succeeded" and snap["result"]["run_id"] == result["run_id"] == job
    assert snap["progress"]["value"] == 6

    # the image URL is made by the replica whose worker ran the job, from its PUBLIC_BASE_URL (here
    # each replica has its own; docs/scaling.md); every replica serves the image (it is in Redis)
    [name] = image_names(result)
    queued = f"queued prompt {result['comfy_response']['prompt_id']} "
    ran = wait_until(lambda: [r for r in (r1, r2) if queued in r.log()], what="the runner's log to name the prompt")
    assert len(ran) == 1
    assert result["comfy_response"]["generated_images"][0]["url"].startswith(ran[0].url + "/")
    assert image(r1, name) == image(r2, name)
    assert not list((r1.folder / "served").rglob("*.png")) and not list((r2.folder / "served").rglob("*.png"))
    missing = requests.get(f"{r2.url}/api/images/img2img_{uuid.uuid4().hex}.png", timeout=10)
    assert missing.status_code == 404 and missing.json()["code"] == "image_not_found"
    unknown = requests.get(f"{r2.url}/api/img2img/jobs/{uuid.uuid4().hex}", timeout=10)
    assert unknown.status_code == 404 and unknown.json()["code"] == "job_not_found"


def test_cancel_from_the_other_replica_stops_a_queued_and_a_running_job(replicas, backends):
    """A job still in the queue is taken out of it and never reaches a backend. A running job is
    stopped by the replica whose worker runs it (told through Redis), on its backend only; its
    live stream, read from the replica that took the job, ends with "cancelled"."""
    a, b = backends
    r1, r2 = replicas.start(), replicas.start()
    a.hang_next()
    b.hang_next()
    running = [accepted(submit(r1, seed=1)), accepted(submit(r1, seed=2))]
    wait_until(lambda: a.running_prompt_id() and b.running_prompt_id(), what="both backends busy")
    queued = accepted(submit(r1, seed=3))

    # the queued job (both backends are busy: it cannot start)
    assert status(r2, queued)["status"] == "queued"
    assert cancel(r2, queued)["status"] == "cancelled"
    assert [k for _, k, _ in events(r1, queued)] == ["queued", "cancelled"]
    assert cancel(r1, queued)["status"] == "cancelled"  # idempotent, from either replica
    assert r1.health()["queue"]["queued"] == 0
    assert a.interrupt_count == b.interrupt_count == 0

    # a running job
    target = running[0]
    snap = wait_status(r2, target, lambda s: s["status"] == "running", "the job to run")
    on = running_on(backends, snap)
    other = b if on is a else a
    assert on is not None
    with ThreadPoolExecutor(1) as pool:
        stream = pool.submit(events, r1, target)  # open while the job runs (hung)
        wait_until(lambda: r2.health()["queue"]["unfinished"] == 2, what="two unfinished jobs")
        answer = cancel(r2, target)
        got = stream.result(timeout=60)
    assert answer["status"] == "cancelled", answer
    assert got[-1][1] == "cancelled" and got[-1][2] == {"type": "cancelled", "job_id": target}
    assert on.interrupt_count == 1 and other.interrupt_count == 0
    assert other.running_prompt_id() is not None, "the other job runs on"
    assert cancel(r1, running[1])["status"] == "cancelled"
    assert other.interrupt_count == 1
    # the cancelled queued job never reached a backend; a new job runs (every slot was given back)
    assert len(a.prompts) + len(b.prompts) == 2
    assert finished(r2, accepted(submit(r2, seed=4)))["status"] == "succeeded"
    assert len(a.prompts) + len(b.prompts) == 3


def test_a_synchronous_request_is_answered_whichever_replica_runs_it(replicas, backends):
    """A request without "async" still runs as a queue job (any replica's worker may take it) and
    is answered by the replica that received it; its image is served by both."""
    r1, r2 = replicas.start(), replicas.start()
    answers = []
    for i, (asked, other) in enumerate([(r1, r2), (r2, r1)] * 2):
        resp = submit(asked, sync=True, seed=20 + i)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["status"] == "success" and body["seed"] == 20 + i
        [name] = image_names(body)
        assert image(other, name) == image(asked, name)
        answers.append(body)
        # a sync request is a job like any other: its record can be read back by its run_id
        assert status(other, body["run_id"])["status"] == "succeeded"
    assert len({b["run_id"] for b in answers}) == 4
    # the errors are the synchronous path's: same code and HTTP status
    backends[0].fail_next(node="KSampler", message="out of memory")
    backends[1].fail_next(node="KSampler", message="out of memory")
    resp = submit(r1, sync=True, seed=30)
    assert resp.status_code == 502 and resp.json()["code"] == "comfyui_execution_error", resp.text
    assert "out of memory" in resp.json()["message"]
    bad = submit(r2, {"steps": 0}, sync=True)
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_parameter"


def test_with_images_in_a_shared_folder_every_replica_serves_them_and_redis_holds_none(
        replicas, backends, redis_server, tmp_path):
    """IMG2IMG_IMAGES=folder: replicas that share SERVED_IMAGES_DIR keep the images there, as one
    process does — synchronous or not, whichever replica ran the job, both serve every image —
    and Redis holds none of them."""
    shared = tmp_path / "shared-served"
    r1 = replicas.start(IMG2IMG_IMAGES="folder", SERVED_IMAGES_DIR=shared)
    r2 = replicas.start(IMG2IMG_IMAGES="folder", SERVED_IMAGES_DIR=shared)
    names = []
    for i, asked in enumerate([r1, r2, r1, r2]):
        resp = submit(asked, sync=True, seed=40 + i)
        assert resp.status_code == 200, resp.text
        names += image_names(resp.json())
    jobs = [accepted(submit(replica, seed=50 + i)) for i, replica in enumerate([r1, r2])]
    for job in jobs:
        snap = finished(r2, job)
        assert snap["status"] == "succeeded", snap
        names += image_names(snap["result"])
    assert len(set(names)) == 6
    for name in names:
        on_disk = (shared / name).read_bytes()
        assert image(r1, name) == image(r2, name) == on_disk
    assert sorted(p.name for p in shared.glob("*.png")) == sorted(names)
    assert redis_server.client().keys("dreamlayer:img2img:image:*") == []
    assert not (r1.folder / "served").exists() and not (r2.folder / "served").exists()


# --- 3. a replica killed mid-job ------------------------------------------------------------------

def runner(redis_url: str, job_id: str, among: list):
    """The replica (of ``among``) whose queue worker runs the job now, per RQ's record of the job
    (its status "started" and its worker's name; RQ registers each worker with its pid), or None."""
    from redis import Redis
    from rq import Worker
    from rq.job import Job, JobStatus

    with Redis.from_url(redis_url, socket_timeout=5) as connection:
        job = Job.fetch(job_id, connection=connection)
        if job.get_status() != JobStatus.STARTED or not job.worker_name:
            return None
        worker = Worker.find_by_key(Worker.redis_worker_namespace_prefix + job.worker_name, connection=connection)
    for replica in among:
        if worker is not None and worker.pid == replica.pid and replica.proc.poll() is None:
            return replica
    return None


def wait_runner(redis_url, job_id, among, what):
    return wait_until(lambda: runner(redis_url, job_id, among), what=what)


def test_a_job_whose_replica_is_killed_is_finished_by_the_other(replicas, backends, redis_server):
    """SIGKILL of the replica running a job: after the lease (2 s) an idle worker of the other
    replica finds it abandoned, queues it again (once) and runs it; the survivor answers with the
    result and serves the image. The first run's prompt, left on its backend, is cancelled."""
    a, b = backends
    a.step_delay = b.step_delay = 0.2  # 50 steps: 10 s, long enough to be killed in the middle
    r1, r2 = replicas.start(), replicas.start()
    job = accepted(submit(r1, {"steps": 50}))
    doomed = wait_runner(redis_server.url, job, [r1, r2], "a replica to run the job")
    survivor = r2 if doomed is r1 else r1
    first = wait_status(survivor, job, lambda s: (s["progress"]["value"] or 0) >= 2, "the job to make progress")
    first_backend = running_on(backends, first)
    assert first_backend is not None
    doomed.kill()

    wait_runner(redis_server.url, job, [survivor], "the survivor to run the job again")
    # the abandoned prompt does not run on for nobody: the rerun cancels it on its backend
    wait_until(lambda: first_backend.running_prompt_id() != first["prompt_id"],
               what="the first run's prompt to be cancelled")
    assert first_backend.interrupt_count == 1
    a.step_delay = b.step_delay = 0.0
    snap = finished(survivor, job)
    assert snap["status"] == "succeeded", snap
    assert snap["prompt_id"] != first["prompt_id"]
    got = events(survivor, job)
    assert [d.get("requeued") for _, k, d in got if k == "queued"].count(True) == 1, got
    assert got[-1][1] == "done" and got[-1][2]["run_id"] == job
    [name] = image_names(snap["result"])
    image(survivor, name)
    assert "Traceback" not in survivor.log(), "the rerun ended with an error in the survivor's log"
    # and the survivor takes new work, on both backends (the dead replica's slot lease ran out)
    a.hang_next()
    b.hang_next()
    held = [accepted(submit(survivor, seed=s)) for s in (1, 2)]
    wait_until(lambda: a.running_prompt_id() and b.running_prompt_id(), what="both backends to run a job")
    for job_id in held:
        assert cancel(survivor, job_id)["status"] == "cancelled"


def test_a_job_taken_ahead_by_a_replica_that_is_killed_is_run_by_the_other(replicas, backends, redis_server):
    """A replica holding both backends' slots, both busy, takes the next job ahead (started in
    RQ's registry, not yet on ComfyUI). SIGKILLed, it loses that job with its two running ones:
    after the lease the other replica runs all three, each queued again once."""
    a, b = backends
    a.step_delay = b.step_delay = 0.2  # 50 steps: 10 s, long enough to be killed in the middle
    r1 = replicas.start()
    running = [accepted(submit(r1, {"steps": 50}, seed=s)) for s in (1, 2)]
    wait_until(lambda: a.running_prompt_id() and b.running_prompt_id(), what="both backends to run a job")
    ahead = accepted(submit(r1, seed=3))
    wait_until(lambda: runner(redis_server.url, ahead, [r1]), what="r1 to take the third job ahead")
    assert len(a.prompts) + len(b.prompts) == 2  # not on ComfyUI yet
    assert status(r1, ahead)["status"] == "queued"
    r2 = replicas.start()  # only now: r1 held every slot
    r1.kill()
    a.step_delay = b.step_delay = 0.0
    for job in running + [ahead]:
        snap = finished(r2, job)
        assert snap["status"] == "succeeded", snap
        assert [d.get("requeued") for _, k, d in events(r2, job) if k == "queued"].count(True) == 1
    assert len(a.prompts) + len(b.prompts) == 5  # two lost prompts (cancelled) and three runs


def test_a_killed_replicas_prompts_are_cancelled_at_once_even_while_every_backend_is_taken(
        replicas, backends, redis_server):
    """The lost runs' prompts go on running on their backends for nobody. Once their slots'
    leases run out, new jobs take those backends (queued behind them in ComfyUI), so the lost
    jobs' reruns wait: the worker that finds the lost jobs cancels their prompts then, instead
    of their reruns doing it once they get a backend — by which time those prompts had run to
    their end, GPU time for nobody while the new jobs waited behind them."""
    a, b = backends
    a.step_delay = b.step_delay = 0.2  # 50 steps: 10 s
    r1 = replicas.start()
    lost = [accepted(submit(r1, {"steps": 50}, seed=s)) for s in (1, 2)]
    wait_until(lambda: a.running_prompt_id() and b.running_prompt_id(), what="both backends to run r1's jobs")
    lost_prompts = {a.running_prompt_id(), b.running_prompt_id()}
    r2 = replicas.start()  # only now: r1 holds every slot
    r1.kill()
    new = [accepted(submit(r2, {"steps": 50}, seed=s)) for s in (3, 4)]  # queued before the reruns
    wait_until(lambda: a.interrupt_count == 1 and b.interrupt_count == 1,
               what="the lost prompts to be cancelled while the new jobs hold both backends")
    # (an interrupt takes effect at the prompt's next step)
    wait_until(lambda: {a.running_prompt_id(), b.running_prompt_id()}.isdisjoint(lost_prompts),
               what="the new jobs' prompts to run in place of the lost ones")
    a.step_delay = b.step_delay = 0.0
    for job in new + lost:
        assert finished(r2, job)["status"] == "succeeded"


def test_a_synchronous_request_run_at_once_whose_replica_is_killed_is_finished_by_the_other(
        replicas, backends, redis_server):
    """A synchronous request that an idle replica runs at once (in the request's own thread, not
    through the queue) is an RQ job all the same: SIGKILL of that replica leaves it in RQ's started
    registry, and after the lease the other replica runs it again to its end (its client lost its
    connection with the replica; the result is readable from the survivor by its run_id)."""
    from redis import Redis

    a, b = backends
    pair = [replicas.start(), replicas.start()]
    tried = set()
    with ThreadPoolExecutor(max_workers=1) as pool:
        for attempt in range(6):
            # a replica lends only its own idle workers' slots: when the other replica's workers
            # hold every slot (they keep one after a job), the request is queued and run there —
            # so the replicas take turns receiving it
            target, survivor = pair[attempt % 2], pair[1 - attempt % 2]
            a.step_delay = b.step_delay = 0.2
            answer = pool.submit(submit, target, {"steps": 50, "seed": 100 + attempt}, sync=True)
            with Redis.from_url(redis_server.url, socket_timeout=5) as redis:
                [job] = wait_until(lambda: [m.decode() for m in redis.smembers("dreamlayer:img2img:live")
                                            if m.decode() not in tried], what="the request's job record")
                worker_name = wait_until(lambda: redis.hget(f"rq:job:{job}", "worker_name"),
                                         what="RQ's record of the job, started").decode()
            tried.add(job)
            if worker_name.endswith(f"-{target.pid}-at-once"):  # run by the target itself, not queued
                break
            # queued (see above, or it came while the worker holding a free slot was between two
            # of its waits for a job, its slot not lendable for that moment): let it finish, try again
            a.step_delay = b.step_delay = 0.0
            assert answer.result(timeout=60).status_code == 200
        else:
            pytest.fail(f"the request was never run at once (last run by {worker_name})")
        first = wait_status(survivor, job, lambda s: s["prompt_id"] is not None, "the job to queue its prompt")
        first_backend = running_on(backends, first)
        target.kill()
        with pytest.raises(requests.ConnectionError):
            answer.result(timeout=60)
    wait_runner(redis_server.url, job, [survivor], "the survivor to run the job again")
    wait_until(lambda: first_backend.running_prompt_id() != first["prompt_id"],
               what="the first run's prompt to be cancelled")
    a.step_delay = b.step_delay = 0.0
    snap = finished(survivor, job)
    assert snap["status"] == "succeeded" and snap["prompt_id"] != first["prompt_id"], snap
    [name] = image_names(snap["result"])
    image(survivor, name)


def test_a_job_whose_worker_is_killed_twice_fails_with_worker_lost(replicas, backends, redis_server):
    """IMG2IMG_ROLE=api answers, IMG2IMG_ROLE=worker replicas run. The job is run again once
    after its worker is killed; killed again, it fails with worker_lost (503) rather than being
    retried for ever, and the API says so."""
    a, b = backends
    a.step_delay = b.step_delay = 0.2
    api = replicas.start("api")
    w1 = replicas.start("worker")
    job = accepted(submit(api, {"steps": 30}))
    wait_runner(redis_server.url, job, [w1], "the only worker to run the job")
    wait_status(api, job, lambda s: (s["progress"]["value"] or 0) >= 1, "the job to make progress")
    w1.kill()

    w2 = replicas.start("worker")
    wait_runner(redis_server.url, job, [w2], "the second worker to run the job again")
    wait_status(api, job, lambda s: s["status"] == "running" and (s["progress"]["value"] or 0) >= 1,
                "the second run to make progress")
    w2.kill()
    a.step_delay = b.step_delay = 0.0

    w3 = replicas.start("worker")
    snap = finished(api, job)
    assert snap["status"] == "failed", snap
    error = snap["error"]
    assert error["code"] == "worker_lost" and error["http_status"] == 503, error
    got = events(api, job)
    assert [d.get("requeued") for _, k, d in got if k == "queued"].count(True) == 1
    assert got[-1][1] == "error" and got[-1][2]["code"] == "worker_lost"
    # the third worker runs new work (the killed workers' slots were given back by their leases)
    assert finished(api, accepted(submit(api, seed=5)))["status"] == "succeeded"
    assert w3.queue_workers() == len(backends) + 1


def test_the_files_a_lost_run_left_in_a_shared_input_folder_are_removed_before_its_job_goes_on(
        tmp_path, redis_server, fake_comfy, reserve_port):
    """A worker killed mid-job leaves the job's staged inputs in ComfyUI's input folder (shared
    with the replicas) — and possibly a half-written one. The worker that finds the lost job
    removes them before the job runs again (elsewhere, its run would not overwrite them) or is
    given up (then nothing else would): nothing of the job is left in the folder at its end, and
    nothing else there is touched."""
    a = fake_comfy
    a.step_delay = 0.2
    shared = {"COMFYUI_INPUT_DIR": a.input_dir, "COMFYUI_OUTPUT_DIR": a.output_dir, "IMG2IMG_QUEUE_WORKERS": 2}
    with replica_group(tmp_path / "replicas", redis_server.url, (a.url,), reserve_port) as group:
        api = group.start("api", **shared)
        w1 = group.start("worker", **shared)
        job = running_masked_job(api)
        staged = {f"img2img_{job}_image.png", f"img2img_{job}_mask.png"}
        assert {p.name for p in a.input_dir.iterdir() if job in p.name} == staged
        # what a kill in the middle of a write leaves (write_atomic's temporary name), and files
        # that are not the job's
        half = a.input_dir / f".tmp-999999-3-img2img_{job}_mask.png.part"
        half.write_bytes(b"\x89PNG")
        others = [a.input_dir / "photo.png", a.input_dir / f"img2img_{uuid.uuid4().hex}_image.png",
                  a.input_dir / f".tmp-999999-4-img2img_{uuid.uuid4().hex}_image.png.part"]
        for other in others:
            other.write_bytes(b"\x89PNG")
        w1.kill()

        w2 = group.start("worker", **shared)
        wait_runner(redis_server.url, job, [w2], "the second worker to run the job again")
        wait_status(api, job, lambda s: s["status"] == "running" and (s["progress"]["value"] or 0) >= 1,
                    "the job to run again and make progress")
        # removed before the job was queued again: the files now are the second run's own
        assert not half.exists()
        assert {p.name for p in a.input_dir.iterdir() if job in p.name} == staged
        w2.kill()
        a.step_delay = 0.0

        group.start("worker", **shared)
        snap = finished(api, job)
        assert snap["status"] == "failed" and snap["error"]["code"] == "worker_lost", snap
        assert [p.name for p in a.input_dir.iterdir() if job in p.name] == []
        assert all(other.exists() for other in others)


def test_the_uploads_a_lost_run_left_on_a_backend_without_a_shared_disk_are_made_small_before_its_job_goes_on(
        tmp_path, redis_server, fake_comfy, reserve_port):
    """The same over HTTP: the job's inputs were uploaded into the backend's temp folder, which
    ComfyUI empties only when it restarts and no route deletes from. The worker that finds the
    lost job overwrites them with a tiny PNG before the job runs again (under the same names) or
    is given up; another run's upload there is left alone."""
    a = fake_comfy
    a.step_delay = 0.2
    workers = {"IMG2IMG_QUEUE_WORKERS": 2}  # no COMFYUI_INPUT_DIR: inputs go over POST /upload/image
    with replica_group(tmp_path / "replicas", redis_server.url, (a.url,), reserve_port) as group:
        api = group.start("api", **workers)
        w1 = group.start("worker", **workers)
        job = running_masked_job(api)
        temp = a.temp_dir / HTTP_UPLOAD_SUBFOLDER
        uploads = [temp / f"img2img_{job}_image.png", temp / f"img2img_{job}_mask.png"]
        assert sorted(p for p in temp.iterdir() if job in p.name) == sorted(uploads)
        whole = {p: p.read_bytes() for p in uploads}
        assert PLACEHOLDER not in whole.values()
        other = temp / f"img2img_{uuid.uuid4().hex}_image.png"  # another run's, still in use
        other.write_bytes(png(gradient(16, 16)))
        w1.kill()

        w2 = group.start("worker", **workers)
        wait_runner(redis_server.url, job, [w2], "the second worker to run the job again")
        wait_status(api, job, lambda s: s["status"] == "running" and (s["progress"]["value"] or 0) >= 1,
                    "the job to run again and make progress")
        # made small before the job was queued again, never after: the second run's are whole
        assert {p: p.read_bytes() for p in uploads} == whole
        w2.kill()
        a.step_delay = 0.0

        group.start("worker", **workers)
        snap = finished(api, job)
        assert snap["status"] == "failed" and snap["error"]["code"] == "worker_lost", snap
        assert sorted(p for p in temp.iterdir() if job in p.name) == sorted(uploads)
        assert all(p.read_bytes() == PLACEHOLDER for p in uploads)
        assert other.read_bytes() == png(gradient(16, 16))


# --- 4. Redis goes away and comes back ----------------------------------------------------------

def test_redis_down_is_a_quick_503_and_the_replicas_recover_when_it_returns(replicas, backends, redis_server):
    r1, r2 = replicas.start(), replicas.start()
    before = submit(r1, sync=True, seed=1)
    assert before.status_code == 200, before.text
    kept = before.json()
    [kept_image] = image_names(kept)
    earlier = accepted(submit(r2, seed=2))
    assert finished(r1, earlier)["status"] == "succeeded"

    redis_server.stop()
    for replica in (r1, r2):
        for sync in (False, True):
            started = time.monotonic()
            resp = submit(replica, sync=sync, seed=3)
            assert time.monotonic() - started < 10, "a request waited for Redis instead of failing"
            assert resp.status_code == 503, resp.text
            body = resp.json()
            assert body["code"] == "queue_unavailable" and "retry" in body["message"], body
        resp = requests.get(f"{replica.url}/api/img2img/jobs/{earlier}", timeout=30)
        assert resp.status_code == 503 and resp.json()["code"] == "queue_unavailable"
        health = replica.health()
        assert health["status"] == "ok" and health["queue"]["reachable"] is False

    redis_server.start()
    # the same processes: their API and queue workers reconnect by themselves
    for replica in (r1, r2):
        wait_until(lambda: replica.health()["queue"]["reachable"], what=f"{replica.name} to reach Redis again")
    jobs = [accepted(submit(r, seed=4 + i)) for i, r in enumerate((r1, r2, r1, r2))]
    for job in jobs:
        assert finished(r2, job)["status"] == "succeeded"
    resp = submit(r2, sync=True, seed=9)
    assert resp.status_code == 200, resp.text
    # what was recorded before the restart is still there (append-only file)
    assert status(r2, kept["run_id"])["status"] == "succeeded"
    assert status(r1, earlier)["status"] == "succeeded"
    for replica in (r1, r2):  # RQ's retry lines (each worker's, every 2 s) summarised: a WARNING an outage
        retries = [line for line in replica.log().splitlines() if "could not connect to redis" in line.lower()]
        assert all(" WARNING " in line for line in retries) and len(retries) <= 2, retries
    assert image(r2, kept_image) == image(r1, kept_image)


# --- 5. a backend dies mid-job --------------------------------------------------------------------

def test_a_backend_dying_mid_job_is_retried_once_on_the_other(replicas, backends):
    """The job's run on a dead backend moves to the other backend (a slot there, shared with
    the other replica's idle workers) and succeeds; the dead backend leaves the rotation of both
    replicas, and new work goes to the backend that answers."""
    a, b = backends
    r1, r2 = replicas.start(), replicas.start()
    a.hang_next()
    b.hang_next()
    jobs = [accepted(submit(r1, seed=1)), accepted(submit(r2, seed=2, params={"steps": 4}))]
    wait_until(lambda: a.running_prompt_id() and b.running_prompt_id(), what="one job on each backend")
    snaps = {job: wait_status(r1, job, lambda s: s["status"] == "running", "the job to run") for job in jobs}
    moved = jobs[1]
    dying = running_on(backends, snaps[moved])
    holder = jobs[0]
    alive = a if dying is b else b
    assert running_on(backends, snaps[holder]) is alive
    dying.die()
    assert cancel(r1, holder)["status"] == "cancelled"  # frees the backend that answers
    snap = finished(r2, moved)
    assert snap["status"] == "succeeded", snap
    assert snap["prompt_id"] in prompt_ids(alive) and snap["result"]["seed"] == 2
    # its stream says so: queued again (retry), then its run on the other backend
    got = [(kind, data) for _, kind, data in events(r1, moved)]
    retry = next(i for i, (kind, data) in enumerate(got) if kind == "queued" and data.get("retry"))
    assert dying.url in got[retry][1]["reason"], got
    assert any(kind == "progress" for kind, _ in got[:retry]) and any(kind == "progress" for kind, _ in got[retry:])
    assert got[-1][0] == "done"
    [name] = image_names(snap["result"])
    image(r1, name)
    for replica in (r1, r2):
        wait_until(lambda: not {x["url"]: x for x in replica.health()["backends"]}[dying.url]["reachable"],
                   what=f"{replica.name} to take the dead backend out of rotation")
    count = len(alive.prompts)
    for i, replica in enumerate((r1, r2)):
        resp = submit(replica, sync=True, seed=20 + i)
        assert resp.status_code == 200, resp.text
    assert len(alive.prompts) == count + 2


# --- 6. every replica replaced -------------------------------------------------------------------

def test_finished_jobs_outlive_every_replica(replicas, backends):
    """Jobs and images live in Redis, not in a replica: stop every replica, start new ones (other
    ports, other folders) and the finished jobs, their events and their images are all there."""
    a, b = backends
    old = [replicas.start(), replicas.start()]
    done = [accepted(submit(old[i % 2], seed=i)) for i in range(4)]
    snaps = {job: finished(old[0], job) for job in done}
    assert all(s["status"] == "succeeded" for s in snaps.values()), snaps
    sync = submit(old[1], sync=True, seed=9)
    assert sync.status_code == 200, sync.text
    # a failed job: one backend busy with a long job, the next job must run on the other, which fails it
    a.step_delay = b.step_delay = 0.1
    long = accepted(submit(old[0], {"steps": 100}, seed=10))  # 10 s unless sped up below
    busy = running_on(backends, wait_status(old[1], long, lambda s: running_on(backends, s) is not None,
                                            "the long job to run"))
    other = b if busy is a else a
    other.fail_next(node="KSampler", message="bad luck")  # the next prompt there; none left after it
    failed = accepted(submit(old[1], seed=11))
    assert finished(old[1], failed)["status"] == "failed"
    a.step_delay = b.step_delay = 0.0
    assert finished(old[0], long)["status"] == "succeeded"
    done.append(long)
    snaps[long] = finished(old[0], long)
    history = {job: events(old[0], job) for job in done + [failed]}
    for replica in old:
        replica.stop()

    new = [replicas.start(), replicas.start()]
    for replica in new:
        for job in done:
            assert status(replica, job) == snaps[job]
            assert events(replica, job) == history[job]
            [name] = image_names(snaps[job]["result"])
            image(replica, name)
        assert status(replica, sync.json()["run_id"])["status"] == "succeeded"
        image(replica, image_names(sync.json())[0])
        error = status(replica, failed)["error"]
        assert error["code"] == "comfyui_execution_error" and "bad luck" in error["message"]
        assert events(replica, failed) == history[failed]
    # and they work
    for replica in new:
        resp = submit(replica, sync=True, seed=30)
        assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("role", ["both", "worker"])
def test_sigterm_lets_the_running_job_finish_before_the_replica_exits(replicas, backends, redis_server, role):
    """docs/scaling.md: a replica stopped with SIGTERM finishes its running jobs first, then
    exits; the job is neither lost nor run again."""
    a, b = backends
    a.step_delay = b.step_delay = 0.1
    api = replicas.start("api")
    runs = replicas.start(role)
    job = accepted(submit(api, {"steps": 20}))
    wait_runner(redis_server.url, job, [runs], "the replica to run the job")
    wait_status(api, job, lambda s: (s["progress"]["value"] or 0) >= 2, "the job to make progress")
    runs.stop()
    assert runs.proc.returncode == 0, runs.log()[-3000:]
    snap = status(api, job)
    assert snap["status"] == "succeeded", snap
    assert snap["progress"]["value"] == 20
    assert not [d for _, k, d in events(api, job) if k == "queued" and d.get("requeued")]


@pytest.mark.parametrize("role", ["both", "worker"])
def test_a_sigterm_taken_by_another_thread_than_the_main_one_stops_the_replica(replicas, role):
    """The kernel hands a process's signal to any of its threads; Python runs the handler in the
    main thread only. kill() with a thread's id makes that thread take it: a worker replica whose
    main thread slept in Event.wait() never woke (a stress run saw one ignore SIGTERM so)."""
    replica = replicas.start(role)
    threads = sorted(int(t) for t in os.listdir(f"/proc/{replica.pid}/task") if int(t) != replica.pid)
    assert threads, "the replica runs threads besides its main one"
    for thread in reversed(threads):  # the newest that still runs
        try:
            os.kill(thread, signal.SIGTERM)
            break
        except ProcessLookupError:
            continue
    try:
        replica.proc.wait(30)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"replica {role} ignored a SIGTERM its thread {thread} took") from None
    assert replica.proc.returncode == 0, replica.log()[-3000:]
    assert "SIGTERM" in replica.log()


def test_a_sigterm_while_a_replica_starts_stops_it_once_started_and_gracefully(replicas, backends):
    """A replica's queue workers take jobs as soon as they are registered, before its HTTP server
    exists (ComfyUI's health check, the server's socket): a SIGTERM then ended the process by the
    signal's default action, with whatever job a worker had just taken. Now it is kept and the
    replica stops as it would once started (exit 0, its log says so)."""
    a, b = backends
    a.freeze()  # the start waits in ComfyUI's health check (up to 3 s), the queue workers registered
    b.freeze()
    try:
        replica = replicas.start("both", ready=False)
        wait_until(lambda: replica.queue_workers() == len(backends) + 1, what="the replica's queue workers")
        replica.proc.terminate()
        wait_until(lambda: "SIGTERM" in replica.log() or replica.proc.poll() is not None,
                   what="the replica to take the SIGTERM")
    finally:
        a.thaw()
        b.thaw()
    try:
        replica.proc.wait(30)
    except subprocess.TimeoutExpired:
        raise AssertionError("the replica did not stop after a SIGTERM while starting") from None
    assert replica.proc.returncode == 0, replica.log()[-3000:]
    assert "SIGTERM" in replica.log()


def test_a_second_sigterm_stops_a_worker_replica_at_once(replicas, backends, redis_server):
    """docs/scaling.md: the first SIGTERM lets the running job finish; a second one ends the
    replica there and then (its job is run again after its lease, as if it had died)."""
    a, b = backends
    a.step_delay = b.step_delay = 0.2
    api = replicas.start("api")
    worker = replicas.start("worker")
    job = accepted(submit(api, {"steps": 100}))  # 20 s at this pace
    wait_runner(redis_server.url, job, [worker], "the worker to run the job")
    wait_status(api, job, lambda s: (s["progress"]["value"] or 0) >= 1, "the job to make progress")
    worker.proc.terminate()
    wait_until(lambda: "stopping the queue workers" in worker.log(), what="the first SIGTERM's log line")
    worker.proc.terminate()
    try:
        worker.proc.wait(10)
    except subprocess.TimeoutExpired:
        raise AssertionError("the second SIGTERM did not end the worker replica") from None
    assert worker.proc.returncode == -signal.SIGTERM, worker.log()[-3000:]
    assert status(api, job)["status"] != "succeeded"


def test_sigterm_lets_a_synchronous_request_in_progress_answer(replicas, backends, redis_server):
    """SIGTERM while a synchronous request runs: the replica stops accepting connections but the
    request still gets its answer (waitress alone ended its socket loop at once, so an answer
    finished after the signal was never sent: the client saw the connection drop)."""
    a, b = backends
    replica = replicas.start()
    for fake in backends:
        fake.hold_views()  # the run ends on ComfyUI; its output download waits here
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            answer = pool.submit(submit, replica, sync=True, seed=8)
            wait_until(lambda: a.views_held() + b.views_held() == 1, what="the request's output download")
            replica.proc.terminate()

            def refused() -> bool:
                try:
                    socket.create_connection(("127.0.0.1", replica.port), timeout=2).close()
                except ConnectionRefusedError:
                    return True
                return False
            wait_until(refused, what="the replica to stop accepting connections")
            for fake in backends:
                fake.release_views()
            resp = answer.result(timeout=60)
        assert resp.status_code == 200 and resp.json()["status"] == "success", resp.text
        assert replica.proc.wait(30) == 0, replica.log()[-3000:]
    finally:
        for fake in backends:
            fake.release_views()


def test_a_paused_replica_whose_job_moved_on_does_not_spoil_its_end(replicas, backends, redis_server):
    """A replica paused (SIGSTOP: a frozen VM, a stalled process) longer than the lease loses its
    job to the other replica, which cancels the lost run's prompt and runs the job again. When the
    paused replica wakes up, its run (now interrupted) must not write the job's end: the job
    succeeds, with the result of the second run."""
    a, b = backends
    a.step_delay = b.step_delay = 0.2
    r1, r2 = replicas.start(), replicas.start()
    job = accepted(submit(r1, {"steps": 50}))
    paused = wait_runner(redis_server.url, job, [r1, r2], "a replica to run the job")
    other = r2 if paused is r1 else r1
    first = wait_status(other, job, lambda s: (s["progress"]["value"] or 0) >= 2, "the job to make progress")
    paused.proc.send_signal(signal.SIGSTOP)
    try:
        wait_runner(redis_server.url, job, [other], "the other replica to run the job again")
        wait_status(other, job, lambda s: s["status"] == "running" and (s["progress"]["value"] or 0) >= 1
                    and s["prompt_id"] != first["prompt_id"], "the second run to make progress")
    finally:
        paused.proc.send_signal(signal.SIGCONT)
    # the paused replica's run now learns that its prompt was interrupted: it must write nothing
    wait_until(lambda: paused.health()["active_generations"] == 0, what="the woken run to end")
    a.step_delay = b.step_delay = 0.0
    snap = finished(other, job)
    assert snap["status"] == "succeeded", snap
    assert snap["prompt_id"] != first["prompt_id"]
    assert status(paused, job) == snap
