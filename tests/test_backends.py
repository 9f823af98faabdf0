"""Several ComfyUI backends behind one service (COMFY_API_URL with a comma-separated list): two real
fake ComfyUI servers on loopback, the real app, requests over the test client or real HTTP."""
import io
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from dreamlayer.img2img.app import create_app, shutdown
from images import box_mask, gradient, png
from service_fixtures import LiveServer
from waiting import wait_until

PARAMS = {"prompt": "a red cube", "steps": 2, "seed": 5, "denoising_strength": 0.5}


@pytest.fixture
def second(second_comfy):
    return second_comfy


@pytest.fixture
def two(service_config, fake_comfy, second):
    """An app whose backends are fake_comfy (shared disk, as COMFYUI_DIR) and ``second`` (HTTP)."""
    app = create_app(service_config.replace(comfy_api_urls=(fake_comfy.url, second.url)))
    yield app
    app.extensions["img2img"].pool.close()


def post(client, params=None, mask=False):
    data = {"params": json.dumps({**PARAMS, **(params or {})}), "image": (io.BytesIO(png(gradient(32, 32))), "i.png")}
    if mask:
        data["mask"] = (io.BytesIO(png(box_mask((32, 32), (8, 8, 24, 24)))), "m.png")
    return client.post("/api/img2img", data=data, content_type="multipart/form-data")


def occupy(pool, client, fake):
    """A request that hangs on ``fake`` (until /interrupt), sent from ``pool``: that backend is busy."""
    fake.hang_next()
    holder = pool.submit(post, client)
    wait_until(fake.running_prompt_id, what="A to be busy")
    return holder


def backends(client):
    return {b["url"]: b for b in client.get("/health").get_json()["backends"]}


def test_config_lists_backends_and_the_first_is_the_primary(service_config, fake_comfy, second):
    cfg = service_config.replace(comfy_api_urls=(fake_comfy.url, second.url + "/"))
    assert cfg.comfy_api_url == fake_comfy.url and cfg.comfy_api_urls == (fake_comfy.url, second.url)
    assert cfg.replace(comfy_api_url=second.url).comfy_api_urls == (second.url,)


def test_work_waits_in_the_service_and_takes_the_first_backend_that_frees(two, fake_comfy, second):
    """One prompt per backend (the default with several): a third request neither queues behind
    a busy ComfyUI nor lets a backend idle; it runs where the first slot frees up."""
    client = two.test_client()
    fake_comfy.hang_next()
    second.hang_next()
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(post, client)
        wait_until(fake_comfy.running_prompt_id, what="the first request to run on backend A")
        blocked = pool.submit(post, client)
        wait_until(second.running_prompt_id, what="the second request to run on backend B")
        third = pool.submit(post, client, {"seed": 6})
        wait_until(lambda: backends(client)[fake_comfy.url]["busy"] == 1 and not third.done(), what="three in flight")
        assert len(fake_comfy.prompts) == 1 and len(second.prompts) == 1  # the third waits in the service
        requests.post(f"{fake_comfy.url}/interrupt", timeout=5)  # A frees up
        assert first.result(timeout=30).status_code == 409
        done = third.result(timeout=30)
        assert done.status_code == 200, done.get_json()
        assert len(fake_comfy.prompts) == 2 and len(second.prompts) == 1  # the third ran on A
        requests.post(f"{second.url}/interrupt", timeout=5)
        assert blocked.result(timeout=30).status_code == 409
    health = backends(client)
    assert [health[u]["busy"] for u in (fake_comfy.url, second.url)] == [0, 0]
    assert health[fake_comfy.url]["jobs_done"] == 1 and health[fake_comfy.url]["jobs_failed"] == 1


def test_a_released_lease_frees_its_backend_at_once_and_counts_the_job_once():
    from dreamlayer.comfyui.pool import Backend, BackendPool

    backend = Backend("http://127.0.0.1:9", client=None)
    pool = BackendPool([backend], slots=1)
    with ThreadPoolExecutor(1) as threads:
        with pool.lease(timeout=5) as lease:
            assert lease.backend is backend and backend.busy == 1
            later = pool.lease(timeout=30)
            waiting = threads.submit(later.__enter__)
            lease.release()
            second = waiting.result(timeout=30)  # got the backend before the first block ended
            assert second.backend is backend and backend.busy == 1 and backend.done == 1
            lease.release()  # twice: counted once
        assert backend.busy == 1 and backend.done == 1 and backend.failed == 0  # the block's end: nothing more
        later.__exit__(None, None, None)
    assert backend.busy == 0 and backend.done == 2


def test_waiting_leases_go_first_come_first_served_and_each_one_that_leaves_the_line_lets_the_next_go():
    """Only the first in line can take a backend, so a change wakes only it; one that gives up
    (its timeout), takes its turn or is stopped (close) must let the one behind it go."""
    from dreamlayer.comfyui.pool import Backend, BackendPool

    backend = Backend("http://127.0.0.1:9", client=None)
    pool = BackendPool([backend], slots=1)
    order = []

    def take(name, timeout):
        with pool.lease(timeout=timeout):
            order.append(name)

    with ThreadPoolExecutor(4) as threads:
        with pool.lease(timeout=5):
            first = threads.submit(take, "first", 120)
            wait_until(lambda: len(pool._line) == 1, what="the first lease to wait")
            quitter = threads.submit(take, "quitter", 0.05)
            with pytest.raises(TimeoutError):  # gave up while second in line
                quitter.result(timeout=30)
            third = threads.submit(take, "third", 120)
            wait_until(lambda: len(pool._line) == 2, what="the third lease to wait behind the first")
        first.result(timeout=30)
        third.result(timeout=30)
        assert order == ["first", "third"] and backend.busy == 0 and backend.done == 3
        with pool.lease(timeout=5):
            stopped = threads.submit(take, "stopped", 120)
            wait_until(lambda: len(pool._line) == 1, what="a lease to wait")
            pool.close()
            with pytest.raises(TimeoutError):  # woken by close, not left waiting for its 2 minutes
                stopped.result(timeout=30)
    assert order == ["first", "third"]


def test_the_prober_asks_every_backend_at_once():
    """One after the other, a hung backend's health check (a timeout) held up what was known of
    the next: here the first answers only once the second has been asked."""
    import threading
    from dreamlayer.comfyui.pool import Backend, BackendPool

    second_asked = threading.Event()

    class FirstClient:
        def is_up(self):
            return second_asked.wait(20)  # as a check that times out, when asked alone

    class SecondClient:
        def is_up(self):
            second_asked.set()
            return True

    first, second = Backend("http://127.0.0.1:1", FirstClient()), Backend("http://127.0.0.1:2", SecondClient())
    first.reachable = second.reachable = False
    BackendPool([first, second]).probe()
    assert first.reachable and second.reachable


def test_a_retry_goes_first_not_to_the_back_of_the_line():
    """A run whose backend was lost waited its turn already: its second lease is ahead of the
    requests that came after it (it went to the back, and could time out behind them)."""
    from dreamlayer.comfyui.pool import Backend, BackendPool

    backend = Backend("http://127.0.0.1:9", client=None)
    pool = BackendPool([backend], slots=1)
    order = []

    def take(name, ahead=False):
        with pool.lease(timeout=120, ahead=ahead):
            order.append(name)

    with ThreadPoolExecutor(3) as threads:
        with pool.lease(timeout=5):
            later = [threads.submit(take, name) for name in ("later 1", "later 2")]
            wait_until(lambda: len(pool._line) == 2, what="two leases to wait")
            retry = threads.submit(take, "retry", True)
            wait_until(lambda: len(pool._line) == 3, what="the retry to wait")
        for future in (retry, *later):
            future.result(timeout=30)
    assert order[0] == "retry" and sorted(order[1:]) == ["later 1", "later 2"]


@pytest.fixture(params=["memory", "redis"])
def remote_one_at_a_time(request, service_config, second):
    """An app whose one backend is ``second``, reached over HTTP only (outputs over GET /view), one
    prompt at a time, with either job store: in this process, or REDIS_URL (queue workers, slots)."""
    changes = {"comfy_api_url": second.url, "comfyui_input_dir": None, "prompts_per_backend": 1}
    if request.param == "redis":
        changes.update(redis_url=request.getfixturevalue("redis_server").url, job_lease_s=2)
    app = create_app(service_config.replace(**changes))
    yield app
    shutdown(app)


def test_the_next_job_starts_on_a_backend_while_the_last_one_downloads_its_outputs(remote_one_at_a_time, second):
    """A backend is free once a job's last prompt has ended: the next job runs there while the
    previous one still reads its outputs (GET /view, held here), instead of waiting for it."""
    client = remote_one_at_a_time.test_client()
    second.hold_views()
    try:
        resp = post(client, {"async": True})  # with REDIS_URL, a queue worker runs it
        assert resp.status_code == 202, resp.get_json()
        job = f"/api/img2img/jobs/{resp.get_json()['job_id']}"
        wait_until(lambda: second.views_held() == 1, what="the first job's output download to be held")
        with ThreadPoolExecutor(1) as pool:
            following = pool.submit(post, client, {"seed": 6})
            wait_until(lambda: second.views_held() == 2, what="the next job to run on the backend meanwhile")
            assert len(second.prompts) == 2 and client.get(job).get_json()["status"] != "succeeded"
            second.release_views()
            assert following.result(timeout=30).status_code == 200
        wait_until(lambda: client.get(job).get_json()["status"] == "succeeded", what="the first job to finish")
    finally:
        second.release_views()


def test_a_job_waiting_for_a_busy_backend_is_cancelled_at_once(remote_one_at_a_time, second):
    """A cancel of a job that waits in the service for a backend (every slot busy) ends it then,
    not once a slot frees: it never reaches ComfyUI."""
    client = remote_one_at_a_time.test_client()
    second.hang_next()
    first = post(client, {"async": True}).get_json()["job_id"]
    wait_until(second.running_prompt_id, what="the first job to hold the backend")
    waiting = post(client, {"async": True, "seed": 6}).get_json()["job_id"]
    assert client.get(f"/api/img2img/jobs/{waiting}").get_json()["status"] == "queued"
    client.post(f"/api/img2img/jobs/{waiting}/cancel")
    wait_until(lambda: client.get(f"/api/img2img/jobs/{waiting}").get_json()["status"] == "cancelled",
               what="the waiting job to be cancelled")
    assert second.running_prompt_id() is not None and len(second.prompts) == 1  # the first still holds it
    client.post("/api/img2img/interrupt")
    wait_until(lambda: client.get(f"/api/img2img/jobs/{first}").get_json()["status"] == "cancelled",
               what="the first job to be interrupted")
    assert len(second.prompts) == 1


def test_a_backend_that_does_not_answer_is_skipped_and_put_back_when_it_answers(two, fake_comfy, second):
    client = two.test_client()
    second.refuse_connections()
    for seed in range(1, 5):  # every request succeeds, some after a retry on the other backend
        resp = post(client, {"seed": seed})
        assert resp.status_code == 200, resp.get_json()
    assert second.prompts == [] and len(fake_comfy.prompts) == 4
    assert backends(client)[second.url]["reachable"] is False
    second.accept_connections()
    wait_until(lambda: backends(client)[second.url]["reachable"], what="the prober to put B back")
    wait_until(lambda: post(client, {"seed": 9}).status_code == 200 and second.prompts, what="B to take work")


def test_a_backend_dying_mid_job_is_retried_once_on_another(two, fake_comfy, second):
    client = two.test_client()
    with ThreadPoolExecutor(2) as pool:
        holder = occupy(pool, client, fake_comfy)
        second.hang_next()
        moved = pool.submit(post, client, {"seed": 7}, True)
        wait_until(second.running_prompt_id, what="the job to run on B")
        second.die()
        requests.post(f"{fake_comfy.url}/interrupt", timeout=5)  # A frees up for the retry
        assert holder.result(timeout=60).status_code == 409
        resp = moved.result(timeout=60)
    assert resp.status_code == 200, resp.get_json()
    assert len(fake_comfy.prompts) == 2  # the retry ran on A
    health = backends(client)
    assert health[second.url]["reachable"] is False and health[second.url]["jobs_failed"] == 1


def quick_to_give_up(app):
    """Waits shorter than a GPU server deserves (5 s without news, 3 s per check, 30 s per call),
    so that a hang shows within about a second."""
    for backend in app.extensions["img2img"].pool.backends:
        backend.client.runner.liveness_interval = backend.client.runner.unreachable_grace = 0.3
        backend.client.http.read_timeout = 1.0


def test_a_backend_that_hangs_mid_job_is_given_up_and_the_job_retried_on_another(two, fake_comfy, second):
    """A hung server (a stuck GPU driver, SIGSTOP) accepts connections and answers nothing; the
    run on it ended only at COMFY_TIMEOUT_S (600 s), as a 504, never retried."""
    quick_to_give_up(two)
    client = two.test_client()
    try:
        with ThreadPoolExecutor(2) as pool:
            holder = occupy(pool, client, fake_comfy)
            second.hang_next()
            moved = pool.submit(post, client, {"seed": 7}, True)
            wait_until(second.running_prompt_id, what="the job to run on B")
            second.freeze()
            wait_until(lambda: backends(client)[second.url]["reachable"] is False, what="B to be given up")
            requests.post(f"{fake_comfy.url}/interrupt", timeout=5)  # A frees up for the retry
            assert holder.result(timeout=60).status_code == 409
            resp = moved.result(timeout=60)
        assert resp.status_code == 200, resp.get_json()
        assert len(fake_comfy.prompts) == 2  # the retry ran on A
    finally:
        second.thaw()


def test_a_backend_that_hangs_while_idle_does_not_capture_requests(two, fake_comfy, second):
    """The request that picked the hung backend (uploads over HTTP) waited for an answer that
    never came: 504 after the 30 s read timeout, not retried."""
    quick_to_give_up(two)
    client = two.test_client()
    second.freeze()
    try:
        with ThreadPoolExecutor(2) as pool:
            holder = occupy(pool, client, fake_comfy)
            moved = pool.submit(post, client, {"seed": 7})
            wait_until(lambda: backends(client)[second.url]["reachable"] is False, what="B to be given up")
            requests.post(f"{fake_comfy.url}/interrupt", timeout=5)
            assert holder.result(timeout=60).status_code == 409
            resp = moved.result(timeout=60)
        assert resp.status_code == 200, resp.get_json()
        assert len(fake_comfy.prompts) == 2 and second.prompts == []
    finally:
        second.thaw()


def test_an_interrupt_with_one_backend_hung_stops_the_others_at_once(two, fake_comfy, second):
    """The cancels of the jobs on each backend go out side by side, each waiting at most
    unreachable_grace (3 s): one after the other, a hung backend's 30-s read timeout came first
    (twice: the jobs' cancel, then the service's), while the others' jobs ran on."""
    client = two.test_client()
    fake_comfy.hang_next()
    second.hang_next()
    on_a = post(client, {"async": True}).get_json()["job_id"]
    wait_until(fake_comfy.running_prompt_id, what="the first job to run on A")
    on_b = post(client, {"async": True, "seed": 6}).get_json()["job_id"]
    wait_until(lambda: client.get(f"/api/img2img/jobs/{on_b}").get_json()["status"] == "running",
               what="the second job to run on B")
    second.freeze()
    try:
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(client.post, "/api/img2img/interrupt").result(timeout=20)  # B: 2 x 3 s
        assert (answer.status_code, answer.get_json()["code"]) == (503, "comfyui_unreachable"), answer.get_json()
        assert second.url in answer.get_json()["message"]
        wait_until(lambda: client.get(f"/api/img2img/jobs/{on_a}").get_json()["status"] == "cancelled",
                   what="the job on A to be cancelled")
        assert client.get(f"/api/img2img/jobs/{on_b}").get_json()["status"] == "running"  # as it was
    finally:
        second.thaw()
    assert client.post(f"/api/img2img/jobs/{on_b}/cancel").status_code == 200  # a retry reaches it
    wait_until(lambda: client.get(f"/api/img2img/jobs/{on_b}").get_json()["status"] == "cancelled",
               what="the job on B to be cancelled")


def test_a_run_asked_to_stop_is_not_started_again_on_another_backend(two, fake_comfy, second):
    """The interrupt could not reach the (hung) backend of a run, which then lost it: the run
    ends there, instead of being retried on another backend as if nobody had asked to stop."""
    for backend in two.extensions["img2img"].pool.backends:
        # the interrupt (1 s to fail on the hung B) long before the run gives B up (5 + 3 x 1 s)
        backend.client.runner.liveness_interval, backend.client.runner.unreachable_grace = 5.0, 1.0
    client = two.test_client()
    try:
        with ThreadPoolExecutor(2) as pool:
            on_a = occupy(pool, client, fake_comfy)
            on_b = occupy(pool, client, second)
            active = two.extensions["img2img"].active
            wait_until(lambda: active.prompt_of(second.running_prompt_id()) is not None,
                       what="the service to know B's prompt")  # else the interrupt finds nothing to send
            second.freeze()
            assert client.post("/api/img2img/interrupt").status_code == 503  # B does not answer
            assert on_a.result(timeout=60).status_code == 409  # A is free for a retry now
            resp = on_b.result(timeout=60)
        assert (resp.status_code, resp.get_json()["code"]) == (503, "comfyui_unreachable"), resp.get_json()
        assert len(fake_comfy.prompts) == 1  # not run again on A
    finally:
        second.thaw()


def test_a_job_retried_on_another_backend_says_so_in_its_status_and_events(two, fake_comfy, second):
    """An async job whose backend dies mid-run is queued again (status "queued", SSE event queued
    with retry true and the reason) until the other backend takes it; its progress starts over."""
    client = two.test_client()
    with ThreadPoolExecutor(1) as pool:
        holder = occupy(pool, client, fake_comfy)
        second.hang_next()
        job_id = post(client, {"seed": 7, "async": True}).get_json()["job_id"]
        wait_until(second.running_prompt_id, what="the job to run on B")
        wait_until(lambda: client.get(f"/api/img2img/jobs/{job_id}").get_json()["progress"]["value"],
                   what="the job to make progress on B")
        second.die()
        snap = wait_until(lambda: (s := client.get(f"/api/img2img/jobs/{job_id}").get_json())["status"] == "queued"
                          and s, what="the job to be queued again")
        assert snap["prompt_id"] is None and snap["progress"]["value"] is None, snap
        requests.post(f"{fake_comfy.url}/interrupt", timeout=5)  # A frees up for the retry
        assert holder.result(timeout=60).status_code == 409
    stream = client.get(f"/api/img2img/jobs/{job_id}/events").data.decode()
    kinds = [line[7:] for line in stream.splitlines() if line.startswith("event: ")]
    datas = [json.loads(line[6:]) for line in stream.splitlines() if line.startswith("data: ")]
    retry = next(i for i, d in enumerate(datas) if d["type"] == "queued" and d.get("retry"))
    assert second.url in datas[retry]["reason"]
    assert "progress" in kinds[:retry] and "progress" in kinds[retry:] and kinds[-1] == "done", kinds


def test_no_backend_left_is_a_distinct_503_and_the_service_recovers(two, fake_comfy, second):
    client = two.test_client()
    fake_comfy.refuse_connections()
    second.hang_next()
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(post, client)
        wait_until(second.running_prompt_id, what="the job to run on B (A does not answer)")
        second.die()  # and A is out of rotation: nowhere left to retry
        resp = job.result(timeout=60)
    assert resp.status_code == 503 and resp.get_json()["code"] == "no_backend_available", resp.get_json()
    assert fake_comfy.url in resp.get_json()["message"] and second.url in resp.get_json()["message"]
    both_down = post(client)
    assert both_down.status_code == 503 and both_down.get_json()["code"] in ("comfyui_unreachable",
                                                                            "no_backend_available")
    fake_comfy.accept_connections()
    wait_until(lambda: post(client).status_code == 200, what="the service to use A again")


def test_a_backend_without_shared_disk_gets_its_inputs_in_comfyuis_temp_folder(two, fake_comfy, second):
    client = two.test_client()
    fake_comfy.refuse_connections()  # every run goes to B
    resp = post(client, mask=True)
    assert resp.status_code == 200, resp.get_json()
    names = [n["inputs"]["image"] for n in resp.get_json()["workflow"].values()
             if n["class_type"] in ("LoadImage", "LoadImageMask")]
    assert names and all(n.endswith(" [temp]") for n in names)
    assert list(second.input_dir.rglob("*.png")) == []
    assert len(list(second.temp_dir.rglob("img2img_*.png"))) == 2
    image = resp.get_json()["comfy_response"]["generated_images"][0]["filename"]
    assert client.get("/images/" + image).status_code == 200  # read over GET /view from B


def test_cancel_reaches_only_the_backend_running_the_job(service_config, fake_comfy, second, server_socket):
    app = create_app(service_config.replace(comfy_api_urls=(fake_comfy.url, second.url)))
    server = LiveServer(app, server_socket).start()
    try:
        fake_comfy.hang_next()
        second.hang_next()
        jobs = []
        for seed in (1, 2):
            resp = requests.post(f"{server.url}/api/img2img", files={"image": ("i.png", png(gradient(32, 32)))},
                                 data={"params": json.dumps({**PARAMS, "seed": seed, "async": True})}, timeout=10)
            assert resp.status_code == 202, resp.text
            jobs.append(resp.json())
        wait_until(lambda: fake_comfy.running_prompt_id() and second.running_prompt_id(), what="both running")

        def prompt_of(job: dict):
            return requests.get(job["status_url"], timeout=5).json().get("prompt_id")

        # a job's status names its prompt once ComfyUI's answer to POST /prompt is read, which may
        # come after the prompt has started running
        wait_until(lambda: {prompt_of(j) for j in jobs} == {fake_comfy.running_prompt_id(), second.running_prompt_id()},
                   what="each job's status to name the prompt running on its backend")
        on_b = [j for j in jobs if prompt_of(j) == second.running_prompt_id()]
        assert len(on_b) == 1
        requests.post(on_b[0]["cancel_url"], timeout=10)
        wait_until(lambda: requests.get(on_b[0]["status_url"], timeout=5).json()["status"] == "cancelled",
                   what="the job on B to be cancelled")
        assert second.interrupt_count >= 1 and fake_comfy.interrupt_count == 0
        assert fake_comfy.running_prompt_id() is not None  # A's job runs on
        answer = requests.post(f"{server.url}/api/img2img/interrupt", json={}, timeout=10).json()
        assert fake_comfy.interrupt_count == 1 and answer["cancelled_jobs"]
    finally:
        server.stop()
        app.extensions["img2img"].pool.close()


def test_one_backend_keeps_comfyuis_own_queue(client, fake_comfy):
    """One URL: unchanged. No cap in the service: a second prompt queues on ComfyUI at once."""
    fake_comfy.hang_next()
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, client)
        wait_until(fake_comfy.running_prompt_id, what="the first to run")
        second = pool.submit(post, client, {"seed": 8})
        wait_until(lambda: len(fake_comfy.prompts) == 2, what="the second to queue on ComfyUI")
        requests.post(f"{fake_comfy.url}/interrupt", timeout=5)
        assert first.result(timeout=30).status_code == 409
        assert second.result(timeout=30).status_code == 200
    assert "backends" not in client.get("/health").get_json()


def test_health_with_several_backends_matches_the_openapi_document(two):
    import yaml
    from pathlib import Path
    from openapi_schema_validator import validate
    doc = yaml.safe_load((Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml").read_text())
    schema = {**doc["components"]["schemas"]["Health"], "components": doc["components"]}
    body = two.test_client().get("/health").get_json()
    assert [b["shared_disk"] for b in body["backends"]] == [True, False]
    validate(body, schema)
