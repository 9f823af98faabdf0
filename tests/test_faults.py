"""ComfyUI faults, caused with the fake ComfyUI, and what the service does about them.

Each fault gets its status and code within a bounded time; afterwards the same service serves a
normal request correctly and nothing is left behind (ComfyUI's input folder, our served folder,
temporary files). Faults already covered by tests/test_img2img_service.py (503 naming the URL,
502 with node errors for a vanished model, 502 naming KSampler, /api/img2img/interrupt, 504 with
cancel) are not repeated here; this file adds recovery, the other phases and paths a fault can
hit, and the faults those tests do not cause at all.
"""
from __future__ import annotations

import io
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from images import box_mask, gradient, png
from dreamlayer.img2img.app import create_app
from waiting import wait_until

SIZE = (64, 48)
BOX = (16, 8, 40, 32)
PARAMS = {"prompt": "a cabin", "steps": 3, "seed": 11, "grow_mask_by": 0, "mask_blur": 0}


# --- helpers --------------------------------------------------------------------------------

def post(client, params=PARAMS, *, image=None, mask=True):
    data = {"params": json.dumps(params), "image": (io.BytesIO(image or png(gradient(*SIZE))), "in.png")}
    if mask:
        data["mask"] = (io.BytesIO(png(box_mask(SIZE, BOX))), "mask.png")
    return client.post("/api/img2img", data=data, content_type="multipart/form-data")


def in_thread(fn, *args, **kwargs):
    pool = ThreadPoolExecutor(1)
    future = pool.submit(fn, *args, **kwargs)
    pool.shutdown(wait=False)
    return future


def error(resp, status, code):
    data = resp.get_json()
    assert resp.status_code == status and resp.content_type == "application/json", (resp.status_code, data)
    assert data["status"] == "error" and data["code"] == code and data["message"], data
    return data


class Ledger:
    """Result files of successful requests: the only files allowed in the served folder."""

    def __init__(self, fake, config):
        self.fake, self.config, self.results = fake, config, set()

    def normal_request_succeeds(self, client):
        """A masked request: 200, the black box regenerated, every other pixel kept exactly."""
        resp = post(client)
        assert resp.status_code == 200, resp.get_json()
        images = resp.get_json()["comfy_response"]["generated_images"]
        self.results.update(i["filename"] for i in images)
        got = client.get(f"/images/{images[0]['filename']}")
        assert got.status_code == 200
        out = np.asarray(Image.open(io.BytesIO(got.data)).convert("RGB"), dtype=int)
        src = np.asarray(gradient(*SIZE), dtype=int)
        inside = np.zeros(out.shape[:2], bool)
        inside[BOX[1]:BOX[3], BOX[0]:BOX[2]] = True
        assert (out[~inside] == src[~inside]).all()
        assert (out[inside] != src[inside]).any(axis=-1).mean() > 0.9

    def assert_nothing_left(self):
        inputs = [p.relative_to(self.fake.input_dir) for p in self.fake.input_dir.rglob("*") if p.is_file()]
        assert inputs == [], "uploads left in ComfyUI's input folder"  # HTTP uploads go to temp/
        served = sorted(p.name for p in self.config.served_images_dir.glob("*"))
        assert served == sorted(self.results), "the served folder holds files no client was given"


@pytest.fixture
def ledger(fake_comfy, service_config):
    return Ledger(fake_comfy, service_config)


def make(service_config, fake_comfy, *, http=False, **changes):
    config = service_config.replace(**changes)
    if http:
        config = config.replace(comfyui_input_dir=None, comfyui_dir=None)
    app = create_app(config)
    return app, app.test_client(), Ledger(fake_comfy, config)


def warnings_of(caplog, logger="dreamlayer.comfyui"):
    return [r.getMessage() for r in caplog.records if r.name.startswith(logger) and r.levelno >= logging.WARNING]


# --- ComfyUI down before the request ----------------------------------------------------------

@pytest.mark.parametrize("http,warm", [(False, False), (False, True), (True, True)],
                         ids=["shared-disk-cold", "shared-disk-warm", "http-upload-warm"])
def test_down_before_the_request_is_a_fast_503_and_the_service_recovers(fake_comfy, service_config, http, warm):
    """cold: nothing cached, object_info fails; warm: object_info cached, staging/queueing fails."""
    app, client, ledger = make(service_config, fake_comfy, http=http, comfy_timeout_s=120)
    if warm:
        ledger.normal_request_succeeds(client)
    fake_comfy.refuse_connections()
    start = time.monotonic()
    data = error(post(client), 503, "comfyui_unreachable")
    assert time.monotonic() - start < 30  # at once, not at COMFY_TIMEOUT_S
    assert fake_comfy.url in data["message"]
    ledger.assert_nothing_left()
    assert client.get("/health").get_json()["comfyui"]["reachable"] is False
    fake_comfy.accept_connections()
    assert client.get("/health").get_json()["comfyui"]["reachable"] is True
    ledger.normal_request_succeeds(client)
    ledger.assert_nothing_left()


# --- ComfyUI dies mid-run --------------------------------------------------------------------

@pytest.mark.parametrize("restarts", [False, True], ids=["stays-down", "restarts-at-once"])
def test_dies_mid_run_fails_long_before_the_timeout(fake_comfy, service_config, restarts):
    """Stays down: HTTP fails for unreachable_grace (3 s). Restarts at once (queue and history
    lost): the liveness check (5 s) finds the prompt gone. Either way 503, far from the 60 s."""
    app, client, ledger = make(service_config, fake_comfy, comfy_timeout_s=60)
    fake_comfy.hang_next()
    future = in_thread(post, client)
    wait_until(lambda: fake_comfy.running_prompt_id() is not None, what="the prompt to run")
    fake_comfy.die()
    died = time.monotonic()
    if restarts:
        fake_comfy.accept_connections()
    data = error(future.result(timeout=60), 503, "comfyui_unreachable")
    assert time.monotonic() - died < 40  # after the grace or the liveness check, far from the 60 s
    assert fake_comfy.url in data["message"]
    assert client.get("/health").get_json()["active_generations"] == 0
    ledger.assert_nothing_left()
    if not restarts:
        fake_comfy.accept_connections()
    ledger.normal_request_succeeds(client)
    ledger.assert_nothing_left()


# --- ComfyUI rejects the workflow ------------------------------------------------------------

def custom_workflow(**extra_nodes):
    wf = {
        "ck": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15-random.safetensors"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "p", "clip": ["ck", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "n", "clip": ["ck", 1]}},
        "load": {"class_type": "LoadImage", "inputs": {"image": "x.png"}},
        "enc": {"class_type": "VAEEncode", "inputs": {"pixels": ["load", 0], "vae": ["ck", 2]}},
        "ks": {"class_type": "KSampler", "inputs": {"model": ["ck", 0], "positive": ["pos", 0],
                                                    "negative": ["neg", 0], "latent_image": ["enc", 0], "seed": 1,
                                                    "steps": 3, "cfg": 7.0, "sampler_name": "euler",
                                                    "scheduler": "normal", "denoise": 0.5}},
        "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["ks", 0], "vae": ["ck", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["dec", 0], "filename_prefix": "mine"}},
    }
    wf.update(extra_nodes)
    return wf


def test_rejected_workflow_with_a_missing_input_is_502_with_comfyuis_node_errors(client, fake_comfy, ledger):
    wf = custom_workflow()
    del wf["dec"]["inputs"]["vae"]
    data = error(post(client, {**PARAMS, "custom_workflow": wf}, mask=False), 502, "comfyui_rejected_workflow")
    assert "dec" in data["node_errors"]
    assert any(e["type"] == "required_input_missing" for e in data["node_errors"]["dec"]["errors"])
    assert fake_comfy.rejected and not fake_comfy.prompts
    ledger.assert_nothing_left()
    ledger.normal_request_succeeds(client)
    ledger.assert_nothing_left()


def test_rejected_workflow_with_a_node_comfyui_lacks_is_502_naming_it(client, fake_comfy, ledger):
    wf = custom_workflow(sharp={"class_type": "NotInstalledSharpen", "inputs": {"image": ["dec", 0]}})
    data = error(post(client, {**PARAMS, "custom_workflow": wf}), 502, "comfyui_rejected_workflow")
    assert "NotInstalledSharpen" in json.dumps(data)
    ledger.assert_nothing_left()
    ledger.normal_request_succeeds(client)
    ledger.assert_nothing_left()


def test_a_model_installed_while_the_service_runs_can_be_used(client, fake_comfy, ledger):
    ledger.normal_request_succeeds(client)  # the service has read ComfyUI's lists
    fake_comfy.add_model("checkpoints", "installed-later.safetensors")
    resp = post(client, {**PARAMS, "model_name": "installed-later.safetensors"})
    assert resp.status_code == 200, resp.get_json()
    ks = [n for n in resp.get_json()["workflow"].values() if n["class_type"] == "CheckpointLoaderSimple"]
    assert ks[0]["inputs"]["ckpt_name"] == "installed-later.safetensors"


# --- a node fails while running --------------------------------------------------------------

@pytest.mark.parametrize("node,exception_type", [("VAEDecode", "torch.OutOfMemoryError"),
                                                 ("SaveImage", "PermissionError")])
def test_execution_error_names_the_node_and_the_exception(client, fake_comfy, ledger, node, exception_type):
    fake_comfy.fail_next(node=node, message="it broke here", exception_type=exception_type)
    data = error(post(client), 502, "comfyui_execution_error")
    assert data["node_type"] == node and data["node_id"]
    assert "it broke here" in data["message"] and node in data["message"]
    assert data.get("exception_type") == exception_type or exception_type in data["message"]
    ledger.assert_nothing_left()
    ledger.normal_request_succeeds(client)
    ledger.assert_nothing_left()


def test_a_batch_that_fails_in_its_second_run_leaves_no_orphaned_results(app, client, fake_comfy, ledger,
                                                                         monkeypatch):
    comfy = app.extensions["img2img"].client.http
    queue_prompt = comfy.queue_prompt

    def arm_before_the_second(*args, **kwargs):  # what goes over the wire is unchanged
        if len(fake_comfy.prompts) == 1:
            fake_comfy.fail_next(node="KSampler", message="second run fails")
        return queue_prompt(*args, **kwargs)

    monkeypatch.setattr(comfy, "queue_prompt", arm_before_the_second)
    error(post(client, {**PARAMS, "batch_count": 2}), 502, "comfyui_execution_error")
    assert len(fake_comfy.prompts) == 2
    ledger.assert_nothing_left()


# --- interrupted -----------------------------------------------------------------------------

def test_interrupt_pressed_in_comfyui_itself_is_409(client, fake_comfy, ledger):
    fake_comfy.hang_next()
    future = in_thread(post, client)
    wait_until(lambda: fake_comfy.running_prompt_id() is not None, what="the prompt to run")
    assert requests.post(f"{fake_comfy.url}/interrupt", timeout=5).status_code == 200
    data = error(future.result(timeout=30), 409, "interrupted")  # at once, not at the 20 s timeout (504)
    assert "interrupted" in data["message"]
    ledger.assert_nothing_left()
    ledger.normal_request_succeeds(client)
    ledger.assert_nothing_left()


def test_prompt_deleted_from_comfyuis_queue_is_409(live_server, fake_comfy, service_config):
    """Someone clears ComfyUI's queue while our prompt waits behind another: found by the
    liveness check (5 s), not at the timeout."""
    ledger = Ledger(fake_comfy, service_config)

    def send():
        files = {"image": ("in.png", png(gradient(*SIZE))), "mask": ("m.png", png(box_mask(SIZE, BOX)))}
        return requests.post(f"{live_server.url}/api/img2img", files=files, data={"params": json.dumps(PARAMS)},
                             timeout=30)

    fake_comfy.hang_next()
    first = in_thread(send)
    wait_until(lambda: fake_comfy.running_prompt_id() is not None, what="the first prompt to run")
    second = in_thread(send)
    wait_until(lambda: len(fake_comfy.prompts) == 2, what="the second prompt to be queued")
    queue = requests.get(f"{fake_comfy.url}/queue", timeout=5).json()
    pending = [item[1] for item in queue["queue_pending"]]
    assert len(pending) == 1
    requests.post(f"{fake_comfy.url}/queue", json={"delete": pending}, timeout=5)
    resp = second.result(timeout=30)
    # interrupted (the liveness check found it gone), not the 504 of the 20 s timeout
    assert resp.status_code == 409 and resp.json()["code"] == "interrupted", resp.text
    requests.post(f"{live_server.url}/api/img2img/interrupt", timeout=5)
    assert first.result(timeout=30).json()["code"] == "interrupted"
    ledger.assert_nothing_left()
    ledger.normal_request_succeeds(live_server.app.test_client())
    ledger.assert_nothing_left()


# --- never finishes --------------------------------------------------------------------------

def test_never_finishes_is_504_at_comfy_timeout_s_then_recovers(fake_comfy, service_config):
    app, client, ledger = make(service_config, fake_comfy, http=True, comfy_timeout_s=1.5)
    interrupts = fake_comfy.interrupt_count
    fake_comfy.hang_next()
    start = time.monotonic()
    data = error(post(client), 504, "comfyui_timeout")
    elapsed = time.monotonic() - start
    assert 1.5 <= elapsed < 15, elapsed  # at the timeout, not later (the prompt hangs forever)
    assert "1.5" in data["message"]
    fake_comfy.wait_idle()  # the hung prompt was cancelled on ComfyUI, not left running
    assert fake_comfy.interrupt_count > interrupts
    ledger.assert_nothing_left()
    ledger.normal_request_succeeds(client)
    ledger.assert_nothing_left()


# --- the WebSocket drops; history is late; /view is slow --------------------------------------

@pytest.mark.parametrize("after_progress", [0, 2])
def test_websocket_drop_result_still_arrives_via_history(client, fake_comfy, ledger, caplog, after_progress):
    caplog.set_level(logging.WARNING, logger="dreamlayer.comfyui")
    fake_comfy.step_delay = 0.03
    fake_comfy.drop_ws_next(after_progress=after_progress)
    ledger.normal_request_succeeds(client)
    assert any("WebSocket" in m and "polling" in m for m in warnings_of(caplog)), warnings_of(caplog)
    ledger.assert_nothing_left()
    ledger.normal_request_succeeds(client)  # and the next one, with a socket again
    ledger.assert_nothing_left()


def test_history_written_late_does_not_hold_up_the_answer(client, fake_comfy, ledger, caplog):
    caplog.set_level(logging.WARNING, logger="dreamlayer.comfyui")
    fake_comfy.history_delay = 3600  # /history held back, far beyond the client's 2 s history grace
    ledger.normal_request_succeeds(client)  # the outputs announced over the socket suffice
    assert not warnings_of(caplog), warnings_of(caplog)
    fake_comfy.history_delay = 0.005  # released
    fake_comfy.wait_idle()
    ledger.normal_request_succeeds(client)
    ledger.assert_nothing_left()


def test_no_history_after_the_grace_and_no_announced_outputs_is_a_bad_response(client, fake_comfy, ledger):
    fake_comfy.announce_outputs = False
    fake_comfy.history_delay = 3600  # /history held back, far beyond the client's 2 s history grace
    resp = post(client, PARAMS)
    assert resp.status_code == 502, resp.get_json()
    assert resp.get_json()["code"] == "comfyui_bad_response"
    assert "/history" in resp.get_json()["message"]
    fake_comfy.announce_outputs = True
    fake_comfy.history_delay = 0.005  # released
    fake_comfy.wait_idle()
    ledger.normal_request_succeeds(client)
    ledger.assert_nothing_left()


def test_slow_view_still_succeeds(client, fake_comfy, ledger):
    fake_comfy.view_delay = 0.6
    start = time.monotonic()
    resp = post(client, {**PARAMS, "batch_size": 2})
    assert resp.status_code == 200, resp.get_json()
    assert time.monotonic() - start >= 0.6
    images = resp.get_json()["comfy_response"]["generated_images"]
    assert len(images) == 2 and len({i["filename"] for i in images}) == 2
    ledger.results.update(i["filename"] for i in images)
    for image in images:
        assert Image.open(io.BytesIO(client.get(f"/images/{image['filename']}").data)).size == SIZE
    fake_comfy.view_delay = 0
    ledger.normal_request_succeeds(client)
    ledger.assert_nothing_left()


# --- a client that hangs up ------------------------------------------------------------------------

def production_server(app, sock, config):
    """The app served by waitress with the service's own settings (app.server_options)."""
    from dreamlayer.img2img.app import server_options
    from service_fixtures import LiveServer
    options = {k: v for k, v in server_options(config).items() if k not in ("host", "port", "threads")}
    return LiveServer(app, sock, **options).start()


def raw_multipart(port: int, params: dict) -> bytes:
    body, ctype = requests.models.RequestEncodingMixin._encode_files(
        {"image": ("i.png", png(gradient(32, 32)), "image/png")}, {"params": json.dumps(params)})
    return (f"POST /api/img2img HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


@pytest.mark.parametrize("store", ["memory", "redis"])
@pytest.mark.parametrize("where", ["running", "waiting for a backend"])
def test_a_client_that_hangs_up_has_its_generation_cancelled(fake_comfy, server_socket, service_config, where,
                                                             store, request):
    """Its prompt ran on to its end (up to COMFY_TIMEOUT_S) for nobody, holding up every request
    behind it, and its images were served to nobody. With REDIS_URL too (the request is a job,
    run by this replica when it is the next one, as here)."""
    import socket
    from dreamlayer.img2img.app import shutdown
    # one prompt at a time (others wait here); no timeout that would end the run in the test's time
    config = service_config.replace(prompts_per_backend=1, comfy_timeout_s=600)
    if store == "redis":
        config = config.replace(redis_url=request.getfixturevalue("redis_server").url, job_lease_s=2)
    app = create_app(config)
    server = production_server(app, server_socket, config)
    pool, jobs = app.extensions["img2img"].pool, app.extensions["img2img_jobs"]

    def waiting() -> int:  # for the backend: in the service's line, or in the queue (REDIS_URL)
        return jobs.health()["queued"] if store == "redis" else len(pool._line)
    fake_comfy.hang_next()
    try:
        with ThreadPoolExecutor(1) as others:
            if where == "waiting for a backend":
                holder = others.submit(requests.post, f"{server.url}/api/img2img", timeout=60, data={
                    "params": json.dumps({**PARAMS, "seed": 9})}, files={"image": ("i.png", png(gradient(32, 32)))})
                wait_until(fake_comfy.running_prompt_id, what="the backend to be taken")
            with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
                sock.sendall(raw_multipart(server.port, {**PARAMS, "seed": 5}))
                if where == "running":
                    wait_until(fake_comfy.running_prompt_id, what="the request's prompt to run")
                else:
                    wait_until(lambda: waiting() == 1, what="the request to wait for the backend")
            # the client is gone
            if where == "running":
                wait_until(lambda: fake_comfy.interrupt_count == 1 and fake_comfy.running_prompt_id() is None,
                           what="its prompt to be interrupted")
            else:
                wait_until(lambda: waiting() == 0, what="it to stop waiting")
                requests.post(f"{fake_comfy.url}/interrupt", timeout=5)
                assert holder.result(timeout=60).status_code == 409
                assert len(fake_comfy.prompts) == 1  # it never reached ComfyUI
        wait_until(lambda: not [p for p in fake_comfy.input_dir.rglob("*") if p.is_file()],
                   what="its inputs to be removed")
        assert not list(config.served_images_dir.glob("*.png"))
    finally:
        server.stop()
        shutdown(app)


def test_an_interrupt_reaches_no_job_still_waiting_for_a_worker(fake_comfy, service_config):
    """Interrupting many async jobs: those still waiting in the service for a worker end without
    ever reaching ComfyUI. One cancel after the other, a worker freed by the first cancel took the
    next job, not marked yet, and queued its prompt (150 jobs: all 150 reached ComfyUI)."""
    from dreamlayer.img2img.app import shutdown
    app = create_app(service_config.replace(job_workers=2))
    client = app.test_client()
    fake_comfy.step_delay = 5.0  # each prompt runs long: the two workers stay busy
    try:
        ids = [client.post("/api/img2img", data={"params": json.dumps({**PARAMS, "seed": i, "async": True}),
                                                 "image": (io.BytesIO(png(gradient(32, 32))), "i.png")},
                           content_type="multipart/form-data").get_json()["job_id"] for i in range(1, 9)]
        wait_until(lambda: len(fake_comfy.prompts) == 2, what="two jobs to reach ComfyUI")
        answer = client.post("/api/img2img/interrupt").get_json()
        assert sorted(answer["cancelled_jobs"]) == sorted(ids)
        for job_id in ids:
            snapshot = wait_until(lambda: (s := client.get(f"/api/img2img/jobs/{job_id}").get_json())["status"]
                                  in ("succeeded", "failed", "cancelled") and s, what=f"job {job_id} to end")
            assert snapshot["status"] == "cancelled", json.dumps(snapshot)[:1500]
        assert len(fake_comfy.prompts) == 2
    finally:
        fake_comfy.step_delay = 0.0
        shutdown(app)


def test_shutdown_closes_the_comfyui_clients_connections(fake_comfy, service_config):
    """The spare WebSocket kept after a run (and its thread) outlived shutdown(app) until
    ComfyUI went away."""
    import threading
    from dreamlayer.img2img.app import shutdown
    app = create_app(service_config)
    assert post(app.test_client(), mask=False).status_code == 200
    assert fake_comfy.client_ids()  # the spare socket, kept for the next run
    shutdown(app)
    wait_until(lambda: not fake_comfy.client_ids(), what="the spare WebSocket to close")
    wait_until(lambda: not [t for t in threading.enumerate() if t.name.startswith("comfy-spare-ws")],
               what="the socket keeper to end")


# --- long requests leave threads for the short ones -----------------------------------------------

def test_with_every_long_request_place_taken_the_service_still_answers_and_says_busy(
        fake_comfy, server_socket, service_config):
    """Synchronous requests waiting for ComfyUI and event streams took every one of waitress's
    threads: the interrupt that would free them, /health, status and images got no answer."""
    from dreamlayer.img2img.app import shutdown
    from service_fixtures import LiveServer
    config = service_config.replace(threads=6)  # 2 long requests at most, 4 threads kept
    app = create_app(config)
    server = LiveServer(app, server_socket, threads=6).start()
    url = server.url

    def generate(seed):
        return requests.post(f"{url}/api/img2img", data={"params": json.dumps({**PARAMS, "seed": seed})},
                             files={"image": ("i.png", png(gradient(32, 32)))}, timeout=60)
    fake_comfy.hang_next()
    try:
        with ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(generate, seed) for seed in (1, 2)]
            wait_until(lambda: len(fake_comfy.prompts) == 2, what="two requests to wait on ComfyUI")
            busy = generate(3)
            assert (busy.status_code, busy.json()["code"]) == (503, "busy") and busy.headers["Retry-After"] == "1"
            job = requests.post(f"{url}/api/img2img", timeout=10, files={"image": ("i.png", png(gradient(32, 32)))},
                                data={"params": json.dumps({**PARAMS, "seed": 4, "async": True})}).json()
            assert requests.get(job["events_url"], timeout=10).json()["code"] == "busy"  # a stream too
            assert requests.get(f"{url}/health", timeout=10).status_code == 200
            assert requests.post(f"{url}/api/img2img/interrupt", timeout=10).status_code == 200
            assert [f.result(timeout=60).status_code for f in waiting] == [409, 409]
        assert generate(5).status_code == 200  # the places came back
        with requests.get(job["events_url"], stream=True, timeout=30) as stream:
            assert stream.status_code == 200
    finally:
        server.stop()
        shutdown(app)


def test_an_event_stream_gives_its_place_back_when_its_client_leaves(fake_comfy, server_socket,
                                                                     service_config):
    from dreamlayer.img2img.app import shutdown
    from service_fixtures import LiveServer
    app = create_app(service_config.replace(threads=5))  # 1 long request at most
    server = LiveServer(app, server_socket, threads=5).start()
    fake_comfy.hang_next()
    try:
        job = requests.post(f"{server.url}/api/img2img", timeout=10, files={"image": ("i.png", png(gradient(32, 32)))},
                            data={"params": json.dumps({**PARAMS, "async": True})}).json()
        first = requests.get(job["events_url"], stream=True, timeout=30)
        assert first.status_code == 200
        assert requests.get(job["events_url"], timeout=10).status_code == 503
        first.close()  # the client leaves mid-stream

        def second_stream_opens():
            with requests.get(job["events_url"], stream=True, timeout=10) as resp:
                return resp.status_code == 200
        wait_until(second_stream_opens, what="the place to come back")
    finally:
        requests.post(f"{fake_comfy.url}/interrupt", timeout=5)
        server.stop()
        shutdown(app)


def test_a_job_whose_cancel_comfyui_lost_ends_cancelled(fake_comfy, service_config):
    """ComfyUI 0.3.40 clears its interrupt flag as a prompt starts: an /interrupt sent then is lost
    and the prompt runs to its end. The job, asked to stop, ended "succeeded" with its images (seen
    under load: an interrupt while a job's prompt was being queued). Staged: the job marked
    cancelled as a cancel marks it, its /interrupt never reaching ComfyUI."""
    from dreamlayer.img2img.app import shutdown
    app = create_app(service_config)
    client, store = app.test_client(), app.extensions["img2img_jobs"]
    fake_comfy.step_delay = 0.2
    try:
        job_id = client.post("/api/img2img", content_type="multipart/form-data", data={
            "params": json.dumps({**PARAMS, "async": True}),
            "image": (io.BytesIO(png(gradient(32, 32))), "i.png")}).get_json()["job_id"]
        wait_until(lambda: fake_comfy.running_prompt_id() and app.extensions["img2img"].active.prompt_id_of(job_id),
                   what="its prompt to run, known to the service")
        assert store._mark_cancelled(store.get(job_id))  # the cancel; its /interrupt lost
        snapshot = wait_until(lambda: (s := client.get(f"/api/img2img/jobs/{job_id}").get_json())["status"]
                              in ("succeeded", "failed", "cancelled") and s, what="the job to end")
        assert snapshot["status"] == "cancelled", snapshot
        assert fake_comfy.interrupt_count == 0 and len(fake_comfy.prompts) == 1  # it did run to its end
        assert not list(service_config.served_images_dir.glob("*.png"))  # nothing served
    finally:
        shutdown(app)


def test_unfinished_async_jobs_are_bounded(fake_comfy, service_config):
    """Each waiting job holds its inputs in memory: 150 jobs of a 2000x2000 image took 2.3 GB."""
    from dreamlayer.img2img.app import shutdown
    app = create_app(service_config.replace(jobs_unfinished=2))
    client = app.test_client()

    def submit(seed):
        return client.post("/api/img2img", content_type="multipart/form-data", data={
            "params": json.dumps({**PARAMS, "seed": seed, "async": True}),
            "image": (io.BytesIO(png(gradient(32, 32))), "i.png")})
    fake_comfy.hang_next()
    try:
        first, second = submit(1), submit(2)
        assert (first.status_code, second.status_code) == (202, 202)
        busy = submit(3)
        assert (busy.status_code, busy.get_json()["code"], busy.headers["Retry-After"]) == (503, "busy", "5")
        assert len(fake_comfy.prompts) <= 2
        client.post("/api/img2img/interrupt")
        for job in (first, second):
            url = f"/api/img2img/jobs/{job.get_json()['job_id']}"
            snapshot = wait_until(lambda: (s := client.get(url).get_json())["status"]
                                  in ("succeeded", "failed", "cancelled") and s, what="the jobs to end")
            assert snapshot["status"] == "cancelled", snapshot
        assert submit(4).status_code == 202  # room again
    finally:
        shutdown(app)
