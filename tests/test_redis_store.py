"""The Redis job store's own guarantees, with a real redis-server: what a cancel of a queued job
leaves behind, a synchronous request no worker takes, Redis going away and coming back, and
that the records expire. (Behaviour shared with the in-process store is tested on both stores in
test_jobs.py and test_stores_sync.py; several replicas in test_scaleout.py.)"""
from __future__ import annotations

import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests

from dreamlayer.img2img.app import create_app, shutdown
from images import gradient, png
from waiting import wait_until

PARAMS = {"prompt": "a cabin", "steps": 2, "seed": 3}


@pytest.fixture
def api_only(service_config, redis_server):
    """A replica that serves the API and runs no queue worker: jobs stay queued."""
    app = create_app(service_config.replace(redis_url=redis_server.url, role="api", comfy_timeout_s=0.5,
                                            job_lease_s=0.2))
    yield app
    shutdown(app)


def post(client, params):
    return client.post("/api/img2img", data={"params": json.dumps(params),
                                              "image": (io.BytesIO(png(gradient(32, 32))), "i.png")},
                       content_type="multipart/form-data")


def keys(redis_server) -> list:
    return sorted(k.decode() for k in redis_server.client().keys("*"))


def test_cancelling_a_queued_job_leaves_only_its_finished_record(api_only, redis_server, fake_comfy):
    client = api_only.test_client()
    accepted = post(client, {**PARAMS, "async": True})
    assert accepted.status_code == 202
    job_id = accepted.get_json()["job_id"]
    assert client.get(f"/api/img2img/jobs/{job_id}").get_json()["status"] == "queued"
    assert f"dreamlayer:img2img:job:{job_id}:inputs" in keys(redis_server)
    answer = client.post(f"/api/img2img/jobs/{job_id}/cancel").get_json()
    assert answer["status"] == "cancelled"
    left = keys(redis_server)
    assert f"rq:job:{job_id}" not in left and f"dreamlayer:img2img:job:{job_id}:inputs" not in left
    assert redis_server.client().llen("rq:queue:dreamlayer-img2img") == 0
    assert redis_server.client().smembers("dreamlayer:img2img:live") == set()
    ttl = redis_server.client().pttl(f"dreamlayer:img2img:job:{job_id}")
    assert 0 < ttl <= 3600 * 1000  # kept for the job TTL, then gone
    events = client.get(f"/api/img2img/jobs/{job_id}/events").data.decode()
    assert events.count("event: ") == 2 and "event: cancelled" in events
    assert fake_comfy.prompts == []


def test_a_synchronous_request_no_worker_takes_times_out_and_is_cancelled(api_only, redis_server, fake_comfy):
    resp = post(api_only.test_client(), PARAMS)
    body = resp.get_json()
    assert resp.status_code == 504 and body["code"] == "comfyui_timeout", body
    assert redis_server.client().llen("rq:queue:dreamlayer-img2img") == 0  # taken out of the queue
    assert redis_server.client().smembers("dreamlayer:img2img:live") == set()


def test_redis_down_is_a_quick_503_and_the_service_recovers(service_config, redis_server, fake_comfy):
    app = create_app(service_config.replace(redis_url=redis_server.url, job_lease_s=1))
    try:
        client = app.test_client()
        assert post(client, PARAMS).status_code == 200
        # /health counts the live queue workers: 4 (one backend, no slot limit)
        wait_until(lambda: client.get("/health").get_json()["queue"]["workers"] == 4, what="4 live workers")
        done = post(client, {**PARAMS, "seed": 4, "async": True}).get_json()["job_id"]
        wait_until(lambda: client.get(f"/api/img2img/jobs/{done}").get_json()["status"] == "succeeded",
                   what="the job to finish")
        redis_server.stop()
        for resp in (post(client, PARAMS), post(client, {**PARAMS, "async": True}),
                     client.get(f"/api/img2img/jobs/{done}")):
            assert resp.status_code == 503 and resp.get_json()["code"] == "queue_unavailable", resp.get_json()
        assert client.get("/health").get_json()["queue"]["reachable"] is False
        redis_server.start()
        wait_until(lambda: post(client, {**PARAMS, "seed": 5}).status_code == 200,
                   what="requests to succeed again once Redis is back")
        assert client.get(f"/api/img2img/jobs/{done}").get_json()["status"] == "succeeded"  # kept (AOF)
    finally:
        shutdown(app)


def test_health_counts_the_workers_again_after_redis_lost_its_data(service_config, redis_server, fake_comfy):
    """A Redis restarted without its data (no AOF / RDB) forgot RQ's worker registrations: the
    workers register again with their heartbeats, so /health's count recovers by itself."""
    app = create_app(service_config.replace(redis_url=redis_server.url, job_lease_s=1))
    try:
        client = app.test_client()
        wait_until(lambda: client.get("/health").get_json()["queue"]["workers"] == 4, what="4 live workers")
        redis_server.client().flushall()
        assert client.get("/health").get_json()["queue"]["workers"] == 0
        wait_until(lambda: client.get("/health").get_json()["queue"]["workers"] == 4,
                   what="the workers to register again")
        assert post(client, PARAMS).status_code == 200
    finally:
        shutdown(app)


def test_finished_records_and_images_carry_the_job_ttl(service_config, redis_server, fake_comfy):
    app = create_app(service_config.replace(redis_url=redis_server.url, job_ttl_s=600))
    try:
        client = app.test_client()
        body = post(client, PARAMS).get_json()
        name = body["comfy_response"]["generated_images"][0]["filename"]
        assert client.get(f"/images/{name}").status_code == 200
        r = redis_server.client()
        ours = [k for k in keys(redis_server) if body["run_id"] in k and ":expired:" not in k]  # record, events, image
        assert len(ours) == 3 and all(0 < r.pttl(k) <= 600_000 for k in ours), {k: r.pttl(k) for k in ours}
    finally:
        shutdown(app)


def test_finished_records_and_images_expire_with_the_job_ttl(service_config, redis_server, fake_comfy):
    app = create_app(service_config.replace(redis_url=redis_server.url, job_ttl_s=0.5))
    try:
        client = app.test_client()
        body = post(client, PARAMS).get_json()
        name = body["comfy_response"]["generated_images"][0]["filename"]
        wait_until(lambda: client.get(f"/images/{name}").status_code == 404, what="the image to expire")
        resp = client.get(f"/api/img2img/jobs/{body['run_id']}")
        assert resp.status_code == 404 and resp.get_json()["code"] == "job_expired"
        assert [k for k in keys(redis_server) if k.startswith("dreamlayer:img2img:") and "expired" not in k] == []
    finally:
        shutdown(app)


def test_after_redis_was_away_longer_than_a_lease_one_prompt_per_backend_still_holds(
        service_config, redis_server, fake_comfy, second_comfy):
    """Idle workers hold backend slots while they wait for a job; when Redis is away longer than a
    slot's lease the slots expire, and a worker must not go on as if it still held one."""
    second = second_comfy
    lease = 2.0
    config = service_config.replace(redis_url=redis_server.url, comfy_api_urls=(fake_comfy.url, second.url),
                                    job_lease_s=lease, queue_workers=3)
    apps = [create_app(config), create_app(config)]  # two replicas, six workers, two slots
    try:
        client = apps[0].test_client()
        assert post(client, PARAMS).status_code == 200
        redis_server.stop()
        outage_end = time.monotonic() + 2 * lease
        wait_until(lambda: time.monotonic() > outage_end, what="an outage longer than the lease")  # the lease is time
        for fake in (fake_comfy, second):
            fake.step_delay = 0.3
        redis_server.start()  # and at once queue work, before the idle workers' Redis retries wake up
        jobs = [post(client, {**PARAMS, "seed": 10 + i, "async": True}).get_json()["job_id"] for i in range(6)]
        most = {fake_comfy.url: 0, second.url: 0}

        def finished():
            for fake in (fake_comfy, second):
                queue = requests.get(f"{fake.url}/queue", timeout=5).json()
                most[fake.url] = max(most[fake.url], len(queue["queue_running"]) + len(queue["queue_pending"]))
            return all(client.get(f"/api/img2img/jobs/{j}").get_json()["status"] in ("succeeded", "failed")
                       for j in jobs)
        wait_until(finished, what="every job to finish")
        assert [client.get(f"/api/img2img/jobs/{j}").get_json()["status"] for j in jobs] == ["succeeded"] * 6
        assert most == {fake_comfy.url: 1, second.url: 1}, most
    finally:
        for app in apps:
            shutdown(app)


def test_the_registry_cleaning_lock_lasts_a_lease_not_fifteen_minutes(redis_server):
    """A replica killed while it holds RQ's cleaning lock must not stop the others from re-running
    abandoned jobs for RQ's 899 s: our queue workers take it for one lease."""
    from dreamlayer.jobs.redis_store import QUEUE_NAME
    from dreamlayer.jobs.rq_worker import WorkerQueue

    queue = WorkerQueue(QUEUE_NAME, connection=redis_server.client())
    queue.lock_s = 2.0
    assert queue.acquire_maintenance_lock() and not queue.acquire_maintenance_lock()
    assert 0 < redis_server.client().pttl(queue.registry_cleaning_key) <= 2000


# --- a synchronous request run at once (QueueWorkers.run_here) --------------------------------------

def seeds(fake) -> list:
    """The seeds of the prompts the fake received, in order."""
    return [next(n["inputs"]["seed"] for n in prompt.values() if n["class_type"] == "KSampler")
            for _, prompt, _ in fake.prompts]


def in_background(fn):
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(fn)
    pool.shutdown(wait=False)
    return future


def test_a_synchronous_request_on_an_idle_replica_runs_at_once_as_an_rq_job_started_here(
        service_config, redis_server, fake_comfy):
    """No trip through the queue when nothing waits and a backend is free: the request's own thread
    runs it, as an RQ job started in RQ's registry with a lease (so a replica killed meanwhile has
    it run again, test_scaleout.py); once answered, the job reads as finished and RQ's bookkeeping
    of it is cleared."""
    app = create_app(service_config.replace(redis_url=redis_server.url))
    redis = redis_server.client()
    try:
        fake_comfy.step_delay = 0.2  # 50 steps: long enough to look at it while it runs
        answer = in_background(lambda: post(app.test_client(), {**PARAMS, "steps": 50}))
        [job_id] = wait_until(lambda: sorted(m.decode() for m in redis.smembers("dreamlayer:img2img:live")),
                              what="the job's record")
        rq_job = wait_until(lambda: redis.hgetall(f"rq:job:{job_id}").get(b"status") == b"started"
                            and redis.hgetall(f"rq:job:{job_id}"), what="RQ's record of it, started")
        assert rq_job[b"worker_name"].decode().endswith("-at-once")  # not a queue worker's
        assert redis.llen("rq:queue:dreamlayer-img2img") == 0  # never queued
        [entry] = redis.zrange("rq:wip:dreamlayer-img2img", 0, -1)  # RQ's started registry: a lease
        assert entry.decode().startswith(f"{job_id}:")
        fake_comfy.step_delay = 0.0
        resp = answer.result(timeout=60)
        body = resp.get_json()
        assert resp.status_code == 200 and body["run_id"] == job_id, body
        # read-your-writes: the answer's job is finished when the answer arrives
        assert app.test_client().get(f"/api/img2img/jobs/{job_id}").get_json()["status"] == "succeeded"
        wait_until(lambda: not redis.exists(f"rq:job:{job_id}") and redis.zcard("rq:wip:dreamlayer-img2img") == 0,
                   what="RQ's bookkeeping of the job to be cleared")
        assert redis.smembers("dreamlayer:img2img:live") == set()
        assert not redis.exists(f"dreamlayer:img2img:job:{job_id}:inputs")
    finally:
        fake_comfy.step_delay = 0.0
        shutdown(app)


def test_a_request_run_at_once_frees_its_backend_slot_when_its_prompt_ends(service_config, redis_server,
                                                                            second_comfy):
    """The slot of a synchronous request run at once goes back as soon as its prompt has ended:
    the next job runs on the backend while this request still reads its output (GET /view, held
    here; a backend with no shared disk and one prompt at a time)."""
    from dreamlayer.jobs.worker import LEND_AFTER_S

    app = create_app(service_config.replace(comfy_api_url=second_comfy.url, comfyui_input_dir=None,
                                            redis_url=redis_server.url, prompts_per_backend=1, job_lease_s=2))
    redis, workers = redis_server.client(), app.extensions["img2img_workers"]
    try:
        for attempt in range(3):
            # the idle worker holding the backend's slot lends it to a request only after LEND_AFTER_S
            wait_until(lambda: any(w.lendable and w.idle_since is not None and time.monotonic() - w.idle_since
                                   > 2 * LEND_AFTER_S for w in list(workers.workers)),
                       what="a queue worker to wait for a job long enough to lend its slot")
            second_comfy.hold_views()
            first = in_background(lambda: post(app.test_client(), {**PARAMS, "seed": 1}))
            wait_until(lambda: second_comfy.views_held() == 1, what="the first request's output download to be held")
            [job_id] = [m.decode() for m in redis.smembers("dreamlayer:img2img:live")]
            if redis.hget(f"rq:job:{job_id}", "worker_name").decode().endswith("-at-once"):
                break
            # it came between two of the worker's 1-s waits for a job (the slot not lendable for a
            # moment) and was queued: let it finish, try again
            second_comfy.release_views()
            assert first.result(timeout=60).status_code == 200
        else:
            pytest.fail("the request was never run at once")
        following = in_background(lambda: post(app.test_client(), {**PARAMS, "seed": 2}))
        wait_until(lambda: second_comfy.views_held() == 2, what="the next request to run on the backend meanwhile")
        assert not first.done()
        second_comfy.release_views()
        for answer in (first, following):
            resp = answer.result(timeout=60)
            assert resp.status_code == 200, resp.get_json()
        assert seeds(second_comfy)[-2:] == [1, 2]
    finally:
        second_comfy.release_views()
        shutdown(app)


def test_a_request_run_at_once_reaches_comfyui_only_once_its_job_is_in_redis(service_config, redis_server,
                                                                             fake_comfy):
    """A synchronous request run at once has its job created in Redis by the writer thread while it
    stages its inputs; its prompt is sent only after that, so a replica killed from then on always
    leaves a job another one runs again. Here the writer is held up: staging done, the prompt waits."""
    app = create_app(service_config.replace(redis_url=redis_server.url))  # one backend: no slots, run at once
    prompt_while_held = []

    def held_writer():  # the job cannot be created meanwhile: no prompt may reach ComfyUI
        staged = wait_until(lambda: [p for p in fake_comfy.input_dir.iterdir() if p.name.startswith("img2img_")],
                            what="the request to stage its inputs")
        deadline = time.monotonic() + 1.0  # a prompt sent without waiting arrives within milliseconds
        while not fake_comfy.prompts and time.monotonic() < deadline:
            time.sleep(0.01)
        prompt_while_held.append((bool(fake_comfy.prompts), bool(staged)))

    try:
        app.extensions["img2img_workers"]._later.put(held_writer)
        resp = post(app.test_client(), PARAMS)
        assert resp.status_code == 200, resp.get_json()
        assert prompt_while_held == [(False, True)]
        assert len(fake_comfy.prompts) == 1
    finally:
        shutdown(app)


def test_a_request_run_at_once_whose_job_cannot_be_created_is_a_503_with_nothing_sent_or_left(
        service_config, redis_server, fake_comfy):
    """Redis goes away between the request's first look at the queue and its job's creation: the
    client gets 503 queue_unavailable, ComfyUI never gets the prompt, the staged inputs are removed,
    and the service goes on once Redis is back."""
    app = create_app(service_config.replace(redis_url=redis_server.url))
    try:
        client = app.test_client()

        def stop_redis_once_staged():  # the writer's next write is the job's creation
            wait_until(lambda: [p for p in fake_comfy.input_dir.iterdir() if p.name.startswith("img2img_")],
                       what="the request to stage its inputs")
            redis_server.stop()

        app.extensions["img2img_workers"]._later.put(stop_redis_once_staged)
        resp = post(client, PARAMS)
        assert resp.status_code == 503 and resp.get_json()["code"] == "queue_unavailable", resp.get_json()
        assert fake_comfy.prompts == []
        assert [p.name for p in fake_comfy.input_dir.iterdir() if p.name.startswith("img2img_")] == []
        redis_server.start()
        wait_until(lambda: post(client, {**PARAMS, "seed": 5}).status_code == 200,
                   what="requests to succeed again once Redis is back")
        assert len(fake_comfy.prompts) == 1
    finally:
        shutdown(app)


def test_a_synchronous_request_does_not_overtake_a_queued_job(service_config, redis_server, fake_comfy):
    """With a job waiting in the queue, a synchronous request waits its turn behind it (it is not
    run at once), even on a backend without a slot limit."""
    app = create_app(service_config.replace(redis_url=redis_server.url, queue_workers=1))
    redis = redis_server.client()
    client = app.test_client()
    try:
        fake_comfy.step_delay = 0.2
        first = post(client, {**PARAMS, "seed": 1, "steps": 50, "async": True}).get_json()["job_id"]
        wait_until(lambda: client.get(f"/api/img2img/jobs/{first}").get_json()["prompt_id"],
                   what="the only queue worker to run the first job")
        assert post(client, {**PARAMS, "seed": 2, "async": True}).status_code == 202
        assert redis.llen("rq:queue:dreamlayer-img2img") == 1
        answer = in_background(lambda: post(app.test_client(), {**PARAMS, "seed": 3}))
        wait_until(lambda: redis.llen("rq:queue:dreamlayer-img2img") == 2, what="the request to be queued behind it")
        fake_comfy.step_delay = 0.0
        resp = answer.result(timeout=60)
        assert resp.status_code == 200, resp.get_json()
        assert seeds(fake_comfy) == [1, 2, 3]
    finally:
        fake_comfy.step_delay = 0.0
        shutdown(app)


def test_a_finished_job_leaves_nothing_of_rq_behind(service_config, redis_server, fake_comfy):
    """RQ's records of a job (its hash, executions, registries) go when it succeeds, whether a
    queue worker ran it (async) or the request's own thread (sync, at once): only the job's own
    record stays, for the job TTL."""
    app = create_app(service_config.replace(redis_url=redis_server.url))
    client = app.test_client()
    redis = redis_server.client()
    try:
        job_id = post(client, {**PARAMS, "async": True}).get_json()["job_id"]
        wait_until(lambda: client.get(f"/api/img2img/jobs/{job_id}").get_json()["status"] == "succeeded",
                   what="the job to succeed")
        run_id = post(client, {**PARAMS, "seed": 4}).get_json()["run_id"]

        def rq_leftovers():
            # (not RQ's "first seen in the intermediate queue" marker, which its maintenance may
            # set while a job passes through that list, and which expires by itself within a day)
            return [k for k in keys(redis_server) if k.startswith("rq:") and ":intermediate:first_seen:" not in k
                    and (job_id in k or run_id in k
                    or k.startswith(("rq:wip:", "rq:execution:", "rq:finished:", "rq:failed:")))
                    and redis.type(k) != b"none" and not (redis.type(k) == b"zset" and redis.zcard(k) == 0)]
        left: list = []

        def gone():
            left[:] = [(k, redis.type(k).decode(), redis.ttl(k)) for k in rq_leftovers()]
            return not left
        try:
            wait_until(gone, what="RQ's records of both jobs to go")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; left: {left}") from None
        for done in (job_id, run_id):
            assert f"dreamlayer:img2img:job:{done}" in keys(redis_server)
            assert f"dreamlayer:img2img:job:{done}:inputs" not in keys(redis_server)
    finally:
        shutdown(app)


def test_a_lease_renewal_that_crosses_the_end_of_its_job_brings_nothing_back(redis_server):
    """The keeper renews leases every lease/5 while jobs end at any moment: a renewal sent just
    after a job's RQ records were deleted must not recreate them (RQ's own heartbeat, an HSET on
    the job, left a job hash with no TTL behind, found by this suite)."""
    from rq.executions import Execution

    from dreamlayer.jobs.rq_worker import WorkerQueue, forget_finished, renew_lease

    redis = redis_server.client()
    queue = WorkerQueue("lease-test", connection=redis)
    job = queue.create_job("builtins.print", job_id="j1", result_ttl=0)
    with redis.pipeline() as pipe:
        job.save(pipeline=pipe)
        execution = Execution.create(job, ttl=30, pipeline=pipe)
        pipe.execute()
    assert redis.exists(job.key, execution.key) == 2
    with redis.pipeline() as pipe:
        renew_lease(job, execution, 30, pipe)  # while it runs: the lease is extended
        pipe.execute()
    assert 0 < redis.ttl(execution.key) <= 30 and redis.zcard(job.started_job_registry.key) == 1
    with redis.pipeline() as pipe:
        forget_finished(job, execution, pipe)
        pipe.execute()
    with redis.pipeline() as pipe:
        renew_lease(job, execution, 30, pipe)  # late
        pipe.execute()
    assert [k.decode() for k in redis.keys("*")] == []


def test_a_job_queued_while_every_backend_is_busy_is_taken_ahead_and_runs_on_the_first_one_freed(
        service_config, redis_server, fake_comfy, second_comfy):
    """One replica holding every backend slot, all busy: its spare worker takes the next job from the
    queue at once (claimed, decoded) and waits with it for a slot, so that it starts the moment a
    prompt ends instead of after RQ's dequeue and preparation. It never makes a second prompt on a
    busy backend, and its status stays "queued" until it runs."""
    fakes = (fake_comfy, second_comfy)
    app = create_app(service_config.replace(redis_url=redis_server.url,
                                            comfy_api_urls=tuple(f.url for f in fakes)))
    most = {f.url: 0 for f in fakes}

    def on_comfyui():
        for fake in fakes:
            queue = requests.get(f"{fake.url}/queue", timeout=5).json()
            most[fake.url] = max(most[fake.url], len(queue["queue_running"]) + len(queue["queue_pending"]))
        return most

    try:
        client = app.test_client()
        for fake in fakes:
            fake.step_delay = 0.2
        long = [post(client, {**PARAMS, "steps": 150, "seed": 20 + i, "async": True}).get_json()["job_id"]
                for i in range(2)]
        wait_until(lambda: all(len(f.prompts) == 1 for f in fakes), what="both backends running a long job")
        wait_until(lambda: all(client.get(f"/api/img2img/jobs/{j}").get_json()["prompt_id"] for j in long),
                   what="the long jobs' records to name their prompts")  # ComfyUI's answer is read after
        ahead = post(client, {**PARAMS, "seed": 30, "async": True}).get_json()["job_id"]
        started = __import__("rq").Queue("dreamlayer-img2img", connection=redis_server.client()).started_job_registry
        wait_until(lambda: redis_server.client().llen("rq:queue:dreamlayer-img2img") == 0
                   and ahead in started.get_job_ids(), what="the third job taken from the queue ahead")
        on_comfyui()
        assert [len(f.prompts) for f in fakes] == [1, 1]  # not on ComfyUI yet
        assert client.get(f"/api/img2img/jobs/{ahead}").get_json()["status"] == "queued"
        assert client.get("/health").get_json()["queue"]["queued"] == 1  # out of RQ's queue, still counted
        freed_id = wait_until(lambda: client.get(f"/api/img2img/jobs/{long[1]}").get_json()["prompt_id"],
                              what="the second long job's prompt id")
        freed = next(f for f in fakes if f.prompts[0][0] == freed_id)  # the backend running long[1]
        other = next(f for f in fakes if f is not freed)
        assert client.post(f"/api/img2img/jobs/{long[1]}/cancel").get_json()["status"] == "cancelled"
        status = lambda: client.get(f"/api/img2img/jobs/{ahead}").get_json()["status"]  # noqa: E731
        wait_until(lambda: on_comfyui() and status() in ("succeeded", "failed"), what="the job taken ahead to run")
        assert status() == "succeeded"
        assert len(freed.prompts) == 2 and len(other.prompts) == 1  # on the freed backend
        assert most == {f.url: 1 for f in fakes}
        client.post(f"/api/img2img/jobs/{long[0]}/cancel")
    finally:
        shutdown(app)


def test_a_job_taken_ahead_is_cancelled_while_it_waits_for_a_slot(service_config, redis_server, fake_comfy,
                                                                  second_comfy):
    """A job taken ahead (every backend busy) is out of RQ's queue, waiting for a slot in its
    worker: a cancel must stop that wait at once — not when a backend frees — and it never
    reaches ComfyUI."""
    fakes = (fake_comfy, second_comfy)
    app = create_app(service_config.replace(redis_url=redis_server.url,
                                            comfy_api_urls=tuple(f.url for f in fakes)))
    try:
        client = app.test_client()
        for fake in fakes:
            fake.hang_next()
        long = [post(client, {**PARAMS, "seed": 20 + i, "async": True}).get_json()["job_id"] for i in range(2)]
        wait_until(lambda: all(len(f.prompts) == 1 for f in fakes), what="both backends running a job")
        ahead = post(client, {**PARAMS, "seed": 30, "async": True}).get_json()["job_id"]
        started = __import__("rq").Queue("dreamlayer-img2img", connection=redis_server.client()).started_job_registry
        wait_until(lambda: redis_server.client().llen("rq:queue:dreamlayer-img2img") == 0
                   and ahead in started.get_job_ids(), what="the third job taken from the queue ahead")
        assert client.post(f"/api/img2img/jobs/{ahead}/cancel").get_json()["status"] == "cancelled"
        assert [len(f.prompts) for f in fakes] == [1, 1]
        assert all(f.running_prompt_id() for f in fakes), "the running jobs go on"
        for job in long:
            assert client.post(f"/api/img2img/jobs/{job}/cancel").get_json()["status"] == "cancelled"
        assert [len(f.prompts) for f in fakes] == [1, 1]  # the cancelled job never ran
    finally:
        shutdown(app)


def test_a_slot_lent_after_redis_was_away_is_not_used_once_another_replica_holds_it(redis_server):
    """Redis away longer than a lease: an idle worker's slot may have expired meanwhile and been
    taken by another replica. A job here that borrows it (RedisSlots.acquire, a request run at
    once) must find that out before its prompt, and take a slot that is free instead."""
    from dreamlayer.comfyui.pool import Backend
    from dreamlayer.jobs.slots import RedisSlots, SharedBackendPool

    a, b = Backend("http://127.0.0.1:1", client=None), Backend("http://127.0.0.1:2", client=None)
    lease = 2.0
    here = RedisSlots(redis_server.client(), SharedBackendPool([a, b], slots=1), lease)
    elsewhere = RedisSlots(redis_server.client(), SharedBackendPool([a, b], slots=1), lease)
    idle = here.try_acquire()  # an idle worker's slot
    assert idle is not None
    redis_server.client().delete(idle.lock.name)  # its lease ran out while Redis was away ...
    theirs = elsewhere.try_acquire(exclude=(b,) if idle.backend is a else (a,))  # ... another took it
    assert theirs is not None and theirs.backend is idle.backend
    idle.renewed_at -= lease  # not renewed since (the keeper could not reach Redis)
    lent = []
    here.lend = lambda usable, idle_before: (lent.append(idle), idle)[1] if not lent and usable(idle.backend) else None
    got = here.acquire(timeout=5)
    assert lent == [idle]
    assert got.backend is not idle.backend  # the free one: never a second prompt on theirs
    assert redis_server.client().get(idle.lock.name) == theirs.lock.local.token  # theirs still
    fresh = elsewhere.try_acquire()
    assert fresh is None  # both slots held, one by each


def test_a_slot_released_while_redis_is_away_frees_itself_and_raises_nothing(redis_server):
    """A job whose prompt ends while Redis is away gives its slot back at the end: that must not
    turn the finished job into a 500 (seen: internal_error); the slot's lease runs out instead."""
    from dreamlayer.comfyui.pool import Backend
    from dreamlayer.jobs.slots import RedisSlots, SharedBackendPool

    a = Backend("http://127.0.0.1:1", client=None)
    here = RedisSlots(redis_server.client(), SharedBackendPool([a], slots=1), 1.0)
    slot = here.try_acquire()
    assert slot is not None
    redis_server.stop()
    here.release(slot)  # no exception
    redis_server.start()
    other = RedisSlots(redis_server.client(), SharedBackendPool([a], slots=1), 1.0)
    wait_until(lambda: other.try_acquire() is not None, what="the slot to free itself after its lease")


def test_a_slot_released_while_the_lease_keeper_renews_it_is_not_taken_again(redis_server):
    """The lease keeper renews a list of slots read before a worker released one of them: its
    renewal must not take that slot again (the "expired, taken again" path), or the slot is held
    by nobody until its lease runs out and its backend stands idle while jobs wait."""
    from dreamlayer.comfyui.pool import Backend
    from dreamlayer.jobs.slots import RedisSlots, SharedBackendPool

    a = Backend("http://127.0.0.1:1", client=None)
    here = RedisSlots(redis_server.client(), SharedBackendPool([a], slots=1), 2.0)
    elsewhere = RedisSlots(redis_server.client(), SharedBackendPool([a], slots=1), 2.0)
    slot = here.try_acquire()
    assert slot is not None and here.all_held_here()
    read_by_the_keeper = [slot]
    here.release(slot)  # the worker's job ended
    assert [s.renew() for s in read_by_the_keeper] == [False]
    assert redis_server.client().get(slot.lock.name) is None
    assert elsewhere.try_acquire() is not None  # free for every replica at once


def test_a_slot_lost_to_another_replica_no_longer_counts_as_held_here(redis_server):
    """A slot whose lease ran out and that another replica took is forgotten by the lease keeper,
    so this replica no longer believes it holds every slot (it would then take jobs ahead to wait
    for its own releases while the other backend is free)."""
    from dreamlayer.comfyui.pool import Backend
    from dreamlayer.jobs.slots import RedisSlots, SharedBackendPool

    a, b = Backend("http://127.0.0.1:1", client=None), Backend("http://127.0.0.1:2", client=None)
    here = RedisSlots(redis_server.client(), SharedBackendPool([a, b], slots=1), 2.0)
    elsewhere = RedisSlots(redis_server.client(), SharedBackendPool([a, b], slots=1), 2.0)
    first, second = here.try_acquire(), here.try_acquire()
    assert first is not None and second is not None and here.all_held_here()
    redis_server.client().delete(first.lock.name)  # its lease ran out ...
    theirs = elsewhere.try_acquire()  # ... and another replica took it
    assert theirs is not None and theirs.backend is first.backend
    here.renew_all()
    assert not here.all_held_here()
    assert redis_server.client().get(first.lock.name) == theirs.lock.local.token
    assert second.renew()  # the other one is still ours


def _waiting_for_a_slot(slots, **kwargs):
    """RedisSlots.acquire in a thread of its own, once it waits: (future, executor)."""
    pool = ThreadPoolExecutor(1)
    before = slots.waiting
    future = pool.submit(slots.acquire, **kwargs)
    wait_until(lambda: slots.waiting > before or future.done(), what="the job waiting for a slot")
    assert not future.done(), future.result()
    return future, pool


def test_a_slot_released_while_a_job_here_waits_for_one_goes_to_it_without_leaving_redis(redis_server):
    """Between two prompts on a backend, a job here waiting for a slot (taken ahead, a retry) gets
    the slot its backend's last job released directly, still held: it is never free in Redis in
    between, where another replica could take it and this job would wait on."""
    from dreamlayer.comfyui.pool import Backend
    from dreamlayer.jobs.slots import RedisSlots, SharedBackendPool

    a = Backend("http://127.0.0.1:1", client=None)
    here = RedisSlots(redis_server.client(), SharedBackendPool([a], slots=1), 5.0)
    elsewhere = RedisSlots(redis_server.client(), SharedBackendPool([a], slots=1), 5.0)
    slot = here.try_acquire()
    token = slot.lock.local.token
    future, pool = _waiting_for_a_slot(here, timeout=30)
    try:
        here.release(slot)  # the running job's prompt ended
        got = future.result(timeout=30)
    finally:
        pool.shutdown()
    assert got is slot and not got.released
    assert redis_server.client().get(slot.lock.name) == token  # held all along, by the same lock
    assert here.all_held_here() and elsewhere.try_acquire() is None
    here.release(got)  # nobody waits now: free for every replica
    assert redis_server.client().get(slot.lock.name) is None
    assert not here.all_held_here() and elsewhere.try_acquire() is not None


def test_a_slot_released_for_a_job_that_cannot_use_it_or_stops_waiting_is_freed_in_redis(redis_server):
    """A slot goes to a waiting job here only if its backend is one the job may use (a retry
    excludes the backend that failed), and one that job leaves untaken (cancelled as it was handed
    over) is freed in Redis: never a slot held for nobody while its backend stands idle."""
    from dreamlayer.comfyui.errors import ComfyInterrupted
    from dreamlayer.comfyui.pool import Backend
    from dreamlayer.jobs.slots import RedisSlots, SharedBackendPool

    lease = 60.0  # no lease runs out during the test: a slot freed in Redis was released
    a, b = Backend("http://127.0.0.1:1", client=None), Backend("http://127.0.0.1:2", client=None)
    here = RedisSlots(redis_server.client(), SharedBackendPool([a, b], slots=1), lease)
    elsewhere = RedisSlots(redis_server.client(), SharedBackendPool([a, b], slots=1), lease)
    on_a, on_b = here.try_acquire(exclude=(b,)), here.try_acquire(exclude=(a,))
    assert on_a.backend is a and on_b.backend is b
    retry, pool = _waiting_for_a_slot(here, timeout=30, exclude=(a,))  # its prompt failed on a
    try:
        here.release(on_a)
        assert redis_server.client().get(on_a.lock.name) is None  # not for the retry: free at once
        assert elsewhere.try_acquire(exclude=(b,)) is not None
        here.release(on_b)
        got = retry.result(timeout=30)
        assert got is on_b and redis_server.client().get(on_b.lock.name) == on_b.lock.local.token
    finally:
        pool.shutdown()

    c = Backend("http://127.0.0.1:3", client=None)
    here = RedisSlots(redis_server.client(), SharedBackendPool([c], slots=1), lease)
    slot, cancelled = here.try_acquire(), []
    ahead, pool = _waiting_for_a_slot(here, timeout=30, cancelled=lambda: bool(cancelled))
    try:
        cancelled.append(True)  # cancelled just as the slot is released for it
        here.release(slot)
        with pytest.raises(ComfyInterrupted):
            ahead.result(timeout=30)
    finally:
        pool.shutdown()
    assert redis_server.client().get(slot.lock.name) is None
    assert not here.all_held_here() and here.try_acquire() is not None


def test_a_slot_found_lost_is_never_handed_to_a_job_waiting_here(redis_server):
    """Redis lost the slot (restarted, or away longer than a lease) and another replica took it:
    once the lease keeper has found that out, the worker's release of it must not hand it to a job
    waiting here, though it was renewed less than half a lease ago (which otherwise passes for
    "surely still ours") — two prompts would then run on one backend."""
    from dreamlayer.comfyui.pool import Backend
    from dreamlayer.jobs.slots import RedisSlots, SharedBackendPool

    a = Backend("http://127.0.0.1:1", client=None)
    here = RedisSlots(redis_server.client(), SharedBackendPool([a], slots=1), 60.0)
    elsewhere = RedisSlots(redis_server.client(), SharedBackendPool([a], slots=1), 60.0)
    slot = here.try_acquire()
    redis_server.client().delete(slot.lock.name)  # Redis forgot it ...
    theirs = elsewhere.try_acquire()  # ... and another replica took it
    assert theirs is not None
    here.renew_all()  # the keeper finds it lost
    waiting, pool = _waiting_for_a_slot(here, timeout=30)
    try:
        here.release(slot)  # the job on it ends
        assert not waiting.done()
        assert redis_server.client().get(slot.lock.name) == theirs.lock.local.token
        elsewhere.release(theirs)  # free for real now: the waiting job gets it
        got = waiting.result(timeout=30)
    finally:
        pool.shutdown()
    assert got is not slot and redis_server.client().get(slot.lock.name) == got.lock.local.token


def test_a_queue_worker_stopped_while_redis_is_away_leaves_no_thread_listening(redis_server):
    """RQ's worker listens for commands on a thread of its own; stopped while Redis is away it
    skipped stopping that thread (its teardown failed first), which then retried every 2 s for as
    long as Redis stayed away, and closed its connection twice with ours (an error in its thread)."""
    import threading

    from dreamlayer.jobs.rq_worker import QueueWorker, WorkerQueue

    errors = []
    previous, threading.excepthook = threading.excepthook, errors.append
    try:
        connection = redis_server.client()
        worker = QueueWorker([WorkerQueue("img2img-test", connection=connection)], connection=connection,
                             runtime=None, name="img2img-test-worker")
        worker.subscribe()
        listening = worker.pubsub_thread
        wait_until(lambda: listening.pubsub.subscribed, what="the command channel subscribed")
        redis_server.stop()
        with pytest.raises(redis.exceptions.ConnectionError):
            worker.teardown()  # its first step (register_death) fails
        wait_until(lambda: not listening.is_alive(), what="the listening thread ended")
        assert errors == []
    finally:
        threading.excepthook = previous


def test_a_job_whose_prompt_waits_in_comfyuis_queue_is_not_counted_as_waiting_for_a_backend(
        service_config, redis_server, fake_comfy):
    """Two prompts per backend: the second job's prompt waits in ComfyUI's own queue, its status
    "queued" with a prompt id. It has its backend: /health's `queued` (jobs waiting for a backend)
    leaves it out; counted, it would read as waiting for as long as the first job runs."""
    app = create_app(service_config.replace(redis_url=redis_server.url, comfy_api_urls=(fake_comfy.url,),
                                            prompts_per_backend=2, queue_workers=2))
    try:
        client = app.test_client()
        fake_comfy.hang_next()
        jobs = [post(client, {**PARAMS, "seed": 40 + i, "async": True}).get_json()["job_id"] for i in range(2)]
        snaps = lambda: [client.get(f"/api/img2img/jobs/{j}").get_json() for j in jobs]  # noqa: E731
        wait_until(lambda: (now := snaps()) and sorted(s["status"] for s in now) == ["queued", "running"]
                   and all(s["prompt_id"] for s in now), what="one job running, the other queued on ComfyUI")
        assert len(fake_comfy.prompts) == 2
        assert client.get("/health").get_json()["queue"]["queued"] == 0
        for job in jobs:
            client.post(f"/api/img2img/jobs/{job}/cancel")
    finally:
        shutdown(app)


def test_idle_workers_with_no_slot_look_for_one_rarely_until_a_job_is_queued(service_config, redis_server,
                                                                               fake_comfy, second_comfy):
    """Every slot held by another replica's idle workers and nothing queued: this replica's workers
    look for a slot less and less often, down to once a second (two idle replicas had each spent
    5 % of a core looking 20 times a second per worker). A job queued brings them back to looking
    every 50 ms, and it runs on the first slot the other replica frees."""
    from dreamlayer.comfyui.pool import Backend
    from dreamlayer.jobs.rq_worker import IDLE_POLL_MAX_S, POLL_S
    from dreamlayer.jobs.slots import RedisSlots, SharedBackendPool

    fakes = (fake_comfy, second_comfy)
    elsewhere = RedisSlots(redis_server.client(), SharedBackendPool([Backend(f.url, client=None) for f in fakes],
                                                                    slots=1), lease_s=120)
    theirs = [elsewhere.try_acquire(), elsewhere.try_acquire()]  # the other replica's idle workers
    assert None not in theirs
    app = create_app(service_config.replace(redis_url=redis_server.url, comfy_api_urls=tuple(f.url for f in fakes)))
    workers = app.extensions["img2img_workers"]
    try:
        wait_until(lambda: len(workers.workers) == 3 and all(w.poll_wait == IDLE_POLL_MAX_S for w in workers.workers),
                   what="every worker looking for a slot once a second")
        client = app.test_client()
        job = post(client, {**PARAMS, "async": True}).get_json()["job_id"]
        wait_until(lambda: all(w.poll_wait == POLL_S for w in workers.workers),
                   what="the workers looking every 50 ms again, a job being queued")
        assert client.get(f"/api/img2img/jobs/{job}").get_json()["status"] == "queued"
        assert [len(f.prompts) for f in fakes] == [0, 0]
        freed = theirs.pop(0)
        elsewhere.release(freed)
        status = lambda: client.get(f"/api/img2img/jobs/{job}").get_json()["status"]  # noqa: E731
        wait_until(lambda: status() in ("succeeded", "failed"), what="the job to run on the freed slot")
        assert status() == "succeeded"
        assert [len(f.prompts) for f in fakes] == [1 if f.url == freed.backend.url else 0 for f in fakes]
    finally:
        for slot in theirs:
            elsewhere.release(slot)
        shutdown(app)


def test_a_failure_handled_while_redis_is_away_says_so_and_does_not_crash(caplog):
    """RQ calls on_failure for a job whose end could not be written (Redis away): it logged
    'queued again' and then raised on its own Redis calls (a second traceback, the worker
    restarted) while nothing was queued — the job runs again when its lease runs out."""
    import socket
    import types
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    from dreamlayer.jobs.rq_worker import on_failure
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    job = types.SimpleNamespace(id="j1", meta={"ttl_s": 60}, retries_left=1,
                                connection=redis.Redis(port=port, retry=Retry(NoBackoff(), 0)))
    with caplog.at_level("WARNING"):
        assert on_failure(job, redis.exceptions.ConnectionError, redis.exceptions.ConnectionError("gone"), None)
    assert "while Redis is away" in caplog.text and "queued again" not in caplog.text
