"""The synchronous request answers the same with both job stores: in this process (the default)
and through Redis (REDIS_URL), where a queue worker runs it as a job. Every ComfyUI failure keeps
its own status and code, bad input is rejected before anything is queued, staged inputs are
removed, and the image URL serves the image."""
from __future__ import annotations

import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from dreamlayer.img2img.app import create_app, shutdown
from images import box_mask, gradient, png
from service_fixtures import LiveServer
from waiting import wait_until

PARAMS = {"prompt": "a cabin", "steps": 3, "seed": 11}


@pytest.fixture(params=["memory", "redis"])
def store(request):
    return request.param


def configure(store, service_config, request, **changes):
    if store == "redis":
        changes.update(redis_url=request.getfixturevalue("redis_server").url, job_lease_s=2)
    return service_config.replace(**changes)


@pytest.fixture
def make(store, service_config, request):
    """make(**config changes) -> a test client of an app with that store; shut down at the end
    (before its Redis server stops: it is asked for first)."""
    if store == "redis":
        request.getfixturevalue("redis_server")
    apps = []

    def build(**changes):
        app = create_app(configure(store, service_config, request, **changes))
        apps.append(app)
        return app.test_client()
    yield build
    for app in apps:
        shutdown(app)


def post(client, params=PARAMS, mask=True):
    data = {"params": json.dumps(params), "image": (io.BytesIO(png(gradient(48, 32))), "in.png")}
    if mask:
        data["mask"] = (io.BytesIO(png(box_mask((48, 32), (8, 8, 40, 24)))), "m.png")
    return client.post("/api/img2img", data=data, content_type="multipart/form-data")


def error(resp, status, code):
    body = resp.get_json()
    assert resp.status_code == status and body["status"] == "error" and body["code"] == code, (resp.status_code, body)
    return body


def staged(fake):
    """Our files left in ComfyUI's input and temp folders."""
    return sorted(p.name for d in (fake.input_dir, fake.temp_dir) if d.exists() for p in d.rglob("img2img_*"))


def test_success_serves_the_image(make, fake_comfy):
    client = make()
    resp = post(client)
    body = resp.get_json()
    assert resp.status_code == 200 and body["status"] == "success", body
    image = body["comfy_response"]["generated_images"][0]
    got = client.get(f"/images/{image['filename']}")
    assert got.status_code == 200 and got.data.startswith(b"\x89PNG")
    assert staged(fake_comfy) == []


def test_bad_input_is_rejected_before_anything_is_queued(make, fake_comfy, store, request):
    client = make()
    error(post(client, {**PARAMS, "steps": 0}), 400, "invalid_parameter")
    error(client.post("/api/img2img", data={"params": json.dumps(PARAMS), "image": (io.BytesIO(b"nope"), "i.png")},
                      content_type="multipart/form-data"), 400, "invalid_image")
    assert fake_comfy.prompts == []
    if store == "redis":
        assert request.getfixturevalue("redis_server").client().keys("dreamlayer:img2img:job:*") == []


def test_comfyui_down_is_a_fast_503(make, fake_comfy):
    client = make(comfy_timeout_s=120)
    fake_comfy.refuse_connections()
    start = time.monotonic()
    body = error(post(client), 503, "comfyui_unreachable")
    assert fake_comfy.url in body["message"] and time.monotonic() - start < 30


def test_execution_error_is_502_naming_the_node(make, fake_comfy):
    client = make()
    fake_comfy.fail_next(node="KSampler", message="out of memory")
    body = error(post(client), 502, "comfyui_execution_error")
    assert "out of memory" in body["message"] and body["node_type"] == "KSampler"
    assert staged(fake_comfy) == []


def test_rejected_workflow_is_502_with_node_errors(make, fake_comfy):
    client = make()
    assert post(client).status_code == 200  # object_info cached: the model below is checked by ComfyUI only
    ckpts = fake_comfy.object_info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    ckpts.remove("tiny-sd15-random.safetensors")  # the model disappears from ComfyUI
    ckpts.append("other.safetensors")
    body = error(post(client), 502, "comfyui_rejected_workflow")
    assert any(e["type"] == "value_not_in_list" for n in body["node_errors"].values() for e in n["errors"])


def test_timeout_is_504_and_cancels_the_prompt(make, fake_comfy):
    client = make(comfy_timeout_s=1.0)
    fake_comfy.hang_next()
    error(post(client), 504, "comfyui_timeout")
    fake_comfy.wait_idle()
    assert fake_comfy.running_prompt_id() is None and staged(fake_comfy) == []


def test_interrupt_is_409_interrupted(store, service_config, request, fake_comfy, server_socket):
    if store == "redis":
        request.getfixturevalue("redis_server")
    app = create_app(configure(store, service_config, request))
    server = LiveServer(app, server_socket).start()
    try:
        fake_comfy.hang_next()
        with ThreadPoolExecutor(1) as pool:
            data = {"params": json.dumps(PARAMS)}
            future = pool.submit(requests.post, f"{server.url}/api/img2img", files={"image": ("i.png", png(gradient(48, 32)))},
                                 data=data, timeout=60)
            wait_until(fake_comfy.running_prompt_id, what="the prompt to run")
            wait_until(lambda: app.extensions["img2img"].active.prompt_of(fake_comfy.running_prompt_id()),
                       what="the service to know its prompt")
            answer = requests.post(f"{server.url}/api/img2img/interrupt", json={}, timeout=10).json()
            assert answer["status"] == "success"
            resp = future.result(timeout=60)
        assert resp.status_code == 409 and resp.json()["code"] == "interrupted", resp.text
    finally:
        server.stop()
        shutdown(app)


def test_the_same_body_from_both_stores(service_config, request, fake_comfy, redis_server):
    """Field for field, apart from the ids and file names a run makes."""
    bodies = []
    for store in ("memory", "redis"):
        app = create_app(configure(store, service_config, request))
        try:
            bodies.append(post(app.test_client()).get_json())
        finally:
            shutdown(app)
    local, queued = bodies
    assert set(local) == set(queued)
    for key in ("status", "message", "seed", "seeds", "warnings"):
        assert local[key] == queued[key], key
    assert set(local["comfy_response"]) == set(queued["comfy_response"])
