"""Async jobs: 202 + status, the SSE progress stream, cancel (pending / running / never someone
else's prompt), expiry, many jobs at once, and stream disconnects."""
from __future__ import annotations

import io
import json
import uuid

import numpy as np
import pytest
import requests
from PIL import Image

from dreamlayer.comfyui import client as comfy_client
from dreamlayer.img2img.app import create_app, shutdown
from dreamlayer.errors import ApiError
from images import box_mask, gradient, png
from service_fixtures import LiveServer
from waiting import wait_until

PARAMS = {"prompt": "a cabin", "steps": 4, "seed": 9, "async": True}
TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(params=["memory", "redis"])
def service_config(request, service_config):
    """Every test here runs against both job stores: in this process (the default) and in a real
    Redis (REDIS_URL), where the app's own queue workers run the jobs."""
    if request.param == "memory":
        return service_config
    return service_config.replace(redis_url=request.getfixturevalue("redis_server").url, job_lease_s=2)


def submit(base, params=None, image=None, mask=None, headers=None):
    files = {"image": ("i.png", image or png(gradient(32, 32)))}
    if mask:
        files["mask"] = ("m.png", mask)
    resp = requests.post(f"{base}/api/img2img", files=files, data={"params": json.dumps(params or PARAMS)},
                         headers=headers or {}, timeout=10)
    return resp


def accepted(resp):
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert set(body) >= {"job_id", "status_url", "events_url", "cancel_url"}
    assert resp.headers["Location"] == body["status_url"]
    return body


def status(job):
    return requests.get(job["status_url"], timeout=5).json()


def wait_for(job, predicate, what="the job's status to change"):
    """The job's first status snapshot that satisfies ``predicate``."""
    seen = []

    def check():
        seen[:] = [status(job)]
        return seen[0] if predicate(seen[0]) else None
    return wait_until(check, what=f"{what} (last status {seen})")


def events(job, timeout=15):
    """Parse the whole SSE stream into (event, data) pairs."""
    out, kind = [], None
    with requests.get(job["events_url"], stream=True, timeout=timeout) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        for line in resp.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                out.append((kind, json.loads(line[6:])))
    return out


def test_events_arrive_in_order_and_end_with_done(live_server, fake_comfy):
    fake_comfy.step_delay = 0.02
    job = accepted(submit(live_server.url))
    got = events(job)
    kinds = [k for k, _ in got]
    assert kinds[0] == "queued" and kinds[-1] == "done"
    assert all(data["type"] == kind for kind, data in got)
    steps = [d["value"] for k, d in got if k == "progress"]
    assert steps == [1, 2, 3, 4] and all(d["max"] == 4 for k, d in got if k == "progress")
    assert kinds.index("progress") < kinds.index("done")
    result = got[-1][1]
    assert result["status"] == "success" and result["comfy_response"]["generated_images"]
    snap = status(job)
    assert snap["status"] == "succeeded" and snap["result"]["run_id"] == result["run_id"]
    assert snap["progress"]["value"] == 4 and snap["prompt_id"] == result["comfy_response"]["prompt_id"]
    img = requests.get(result["comfy_response"]["generated_images"][0]["url"], timeout=5)
    assert img.status_code == 200
    # a late subscriber gets the whole history, and Last-Event-ID resumes after it
    assert [k for k, _ in events(job)] == kinds
    with requests.get(job["events_url"], headers={"Last-Event-ID": str(len(got) - 1)}, stream=True,
                      timeout=5) as resp:
        assert [line for line in resp.iter_lines(decode_unicode=True) if line.startswith("event:")] == ["event: done"]


def test_prefer_respond_async_header(live_server):
    params = {k: v for k, v in PARAMS.items() if k != "async"}
    job = accepted(submit(live_server.url, params, headers={"Prefer": "respond-async"}))
    assert wait_for(job, lambda s: s["status"] == "succeeded")["result"]["status"] == "success"
    # a preference: the parameters' explicit "async": false wins
    resp = submit(live_server.url, {**params, "async": False}, headers={"Prefer": "respond-async"})
    assert resp.status_code == 200 and resp.json()["status"] == "success" and "Preference-Applied" not in resp.headers


def test_bad_input_is_rejected_before_any_job(live_server, fake_comfy):
    resp = submit(live_server.url, {**PARAMS, "steps": 0})
    assert resp.status_code == 400 and resp.json()["code"] == "invalid_parameter"
    resp = submit(live_server.url, PARAMS, image=b"nope")
    assert resp.status_code == 400 and resp.json()["code"] == "invalid_image"
    assert fake_comfy.prompts == []


def test_failed_job_carries_the_same_error_object(live_server, fake_comfy):
    fake_comfy.fail_next(node="KSampler", message="out of memory")
    job = accepted(submit(live_server.url))
    got = events(job)
    kind, err = got[-1]
    assert kind == "error" and err["code"] == "comfyui_execution_error" and "out of memory" in err["message"]
    snap = status(job)
    assert snap["status"] == "failed" and snap["error"]["code"] == "comfyui_execution_error"
    assert snap["result"] is None


def test_cancel_pending_then_running(live_server, fake_comfy):
    fake_comfy.hang_next()
    first = accepted(submit(live_server.url))
    running = wait_for(first, lambda s: s["status"] == "running")
    second = accepted(submit(live_server.url, {**PARAMS, "seed": 10}))
    pending = wait_for(second, lambda s: s["queue_position"] == 1)
    assert pending["status"] == "queued" and pending["prompt_id"]

    answer = requests.post(second["cancel_url"], timeout=5).json()
    assert answer["status"] == "cancelled"
    assert fake_comfy.interrupt_count == 0, "cancelling a pending prompt must not interrupt the running one"
    assert fake_comfy.running_prompt_id() == running["prompt_id"]
    assert events(second)[-1][0] == "cancelled"
    assert requests.post(second["cancel_url"], timeout=5).json()["status"] == "cancelled"  # idempotent

    requests.post(first["cancel_url"], timeout=5)
    assert wait_for(first, lambda s: s["status"] in ("cancelled", "failed"))["status"] == "cancelled"
    assert fake_comfy.interrupt_count == 1
    assert requests.post(first["cancel_url"], timeout=5).json()["status"] == "cancelled"
    assert fake_comfy.interrupt_count == 1
    assert not [p for p in fake_comfy.input_dir.rglob("*") if p.is_file()]


def test_cancel_never_touches_another_clients_prompt(live_server, fake_comfy, tmp_path):
    """Someone else's prompt runs on the same ComfyUI; cancelling our queued job must not stop it."""
    other = comfy_client.ComfyClient(fake_comfy.url)
    (fake_comfy.input_dir / "other.png").write_bytes(png(gradient(16, 16)))
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15-random.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["1", 1]}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "other.png"}},
        "5": {"class_type": "VAEEncode", "inputs": {"pixels": ["4", 0], "vae": ["1", 2]}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0],
                                                   "latent_image": ["5", 0], "seed": 1, "steps": 2, "cfg": 7.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "other"}},
    }
    fake_comfy.hang_next()
    other_id = other.queue_prompt(prompt, str(uuid.uuid4()))
    wait_until(lambda: fake_comfy.running_prompt_id() == other_id, what="the other client's prompt to run")
    job = accepted(submit(live_server.url))
    wait_for(job, lambda s: s["queue_position"] == 1)
    assert requests.post(job["cancel_url"], timeout=5).json()["status"] == "cancelled"
    # the frontend's interrupt button must not stop it either
    assert requests.post(f"{live_server.url}/api/img2img/interrupt", json={}, timeout=5).status_code == 200
    assert fake_comfy.interrupt_count == 0 and fake_comfy.running_prompt_id() == other_id
    other.interrupt()


def test_interrupt_endpoint_cancels_our_jobs(live_server, fake_comfy):
    fake_comfy.hang_next()
    job = accepted(submit(live_server.url))
    wait_for(job, lambda s: s["status"] == "running")
    running = status(job)["prompt_id"] or wait_for(job, lambda s: s["prompt_id"])["prompt_id"]
    answer = requests.post(f"{live_server.url}/api/img2img/interrupt", json={}, timeout=5).json()
    assert answer["cancelled_jobs"] == [job["job_id"]]
    # the job's prompt is listed as stopped, as a synchronous request's is (in this process: with
    # REDIS_URL the replica running it stops it, after this answer)
    if not live_server.app.config["IMG2IMG"].redis_url:
        assert answer["interrupted"] == [running] and answer["outcomes"] == {running: "interrupted"}
    assert wait_for(job, lambda s: s["status"] != "running")["status"] == "cancelled"


def test_a_cancel_while_comfyui_cannot_be_reached_is_not_lost(live_server, fake_comfy, service_config):
    """In this process the cancel is a 503 and did not happen (a retry delivers it; it used to
    answer 200 "running" while nothing was stopped, and the job then succeeded). With REDIS_URL
    it is announced (200) and the replica running the job delivers it once ComfyUI is back."""
    fake_comfy.hang_next()
    job = accepted(submit(live_server.url))
    wait_for(job, lambda s: s["status"] == "running" and s["prompt_id"])
    fake_comfy.refuse_connections()
    try:
        if service_config.redis_url:
            assert requests.post(job["cancel_url"], timeout=30).status_code == 200
        for url in () if service_config.redis_url else (job["cancel_url"], f"{live_server.url}/api/img2img/interrupt"):
            resp = requests.post(url, json={}, timeout=30)
            assert resp.status_code == 503 and resp.json()["code"] == "comfyui_unreachable", resp.text
        assert fake_comfy.interrupt_count == 0 and status(job)["status"] == "running"
    finally:
        fake_comfy.accept_connections()
    if not service_config.redis_url:
        assert requests.post(job["cancel_url"], timeout=30).status_code == 200
    assert wait_for(job, lambda s: s["status"] != "running")["status"] == "cancelled"
    assert fake_comfy.interrupt_count == 1


def test_finished_jobs_expire_after_their_ttl_with_a_clear_code(fake_comfy, service_config, server_socket):
    app = create_app(service_config.replace(job_ttl_s=0.3))
    server = LiveServer(app, server_socket).start()
    try:
        job = accepted(submit(server.url))
        # the job runs, finishes, and 0.3 s later is forgotten: its status URL then says so
        gone = wait_until(lambda: (r := requests.get(job["status_url"], timeout=5)).status_code == 404 and r.json(),
                          what="the finished job to expire")
        assert gone["code"] == "job_expired"
        resp = requests.get(f"{server.url}/api/img2img/jobs/{uuid.uuid4().hex}", timeout=5)
        assert resp.status_code == 404 and resp.json()["code"] == "job_not_found"
    finally:
        server.stop()
        shutdown(app)


def test_only_the_newest_finished_jobs_are_kept(fake_comfy, service_config, server_socket):
    """IMG2IMG_JOBS_KEPT: a finished job stays readable until newer ones push it out (in this
    process; Redis keeps finished jobs by their TTL alone, docs/scaling.md)."""
    if service_config.redis_url:
        pytest.skip("IMG2IMG_JOBS_KEPT applies to the in-process store only")
    server = LiveServer(create_app(service_config.replace(jobs_kept=1)), server_socket).start()
    try:
        first = accepted(submit(server.url))
        assert wait_for(first, lambda s: s["status"] in TERMINAL)["status"] == "succeeded"
        second = accepted(submit(server.url, {**PARAMS, "seed": 10}))
        assert wait_for(second, lambda s: s["status"] in TERMINAL)["status"] == "succeeded"
        assert status(first)["code"] == "job_expired"
        assert status(second)["status"] == "succeeded"
    finally:
        server.stop()


def test_many_jobs_at_once_each_get_their_own_result(live_server, fake_comfy):
    colours = [(i * 25, 200 - i * 20, 90) for i in range(8)]
    jobs = [accepted(submit(live_server.url, {**PARAMS, "steps": 2},
                            image=png(Image.new("RGB", (32, 32), c)), mask=png(box_mask((32, 32), (0, 0, 8, 8)))))
            for c in colours]
    for colour, job in zip(colours, jobs):
        snap = wait_for(job, lambda s: s["status"] in ("succeeded", "failed"))
        assert snap["status"] == "succeeded", snap
        url = snap["result"]["comfy_response"]["generated_images"][0]["url"]
        out = np.asarray(Image.open(io.BytesIO(requests.get(url, timeout=5).content)).convert("RGB"))
        assert (out[16:, 16:] == np.array(colour)).all()
    assert len({j["job_id"] for j in jobs}) == len(jobs)


def test_leaving_the_event_stream_neither_cancels_nor_leaks(live_server, fake_comfy):
    fake_comfy.step_delay = 0.05
    job = accepted(submit(live_server.url, {**PARAMS, "steps": 10}))
    with requests.get(job["events_url"], stream=True, timeout=5) as resp:
        next(resp.iter_lines())  # read one line, then hang up
    snap = wait_for(job, lambda s: s["status"] in TERMINAL)
    assert snap["status"] == "succeeded"
    # the worker thread that served the abandoned stream is free again
    dispatcher = live_server.server.task_dispatcher
    wait_until(lambda: dispatcher.active_count == 0, what="the worker of the abandoned stream to be free")


def test_expired_ids_are_remembered_up_to_the_documented_window(monkeypatch):
    """docs/api.md: the last 10,000 expired ids answer job_expired, older ones job_not_found."""
    from dreamlayer.jobs import store as job_store
    assert job_store.EXPIRED_IDS_REMEMBERED == 10_000
    monkeypatch.setattr(job_store, "EXPIRED_IDS_REMEMBERED", 3)
    jobs = job_store.JobStore(service=None, workers=1, max_kept=1)
    try:
        ids = [f"job{i}" for i in range(6)]
        for job_id in ids:  # each finished job pushes the one before it out (max_kept=1)
            job = job_store.Job(job_id)
            job.finish("succeeded", result={})
            jobs._jobs[job_id] = job
            jobs.get(job_id)
        codes = []
        for job_id in ids[:-1]:
            with pytest.raises(ApiError) as info:
                jobs.get(job_id)
            codes.append(info.value.code)
        assert codes == ["job_not_found", "job_not_found", "job_expired", "job_expired", "job_expired"]
        assert jobs.get(ids[-1]).status == "succeeded"
    finally:
        jobs.shutdown()
