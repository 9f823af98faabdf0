"""The img2img service end to end: the real Flask app (over real HTTP where it matters) and the
fake ComfyUI over real sockets. Pixel assertions rely on the fake's pixel model: the latent is the
image itself and KSampler replaces exactly the noise-masked pixels."""
from __future__ import annotations

import base64
import errno
import io
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from images import box_mask, gradient, png
from waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
BOX = (16, 16, 48, 40)  # the black (inpaint) area of the default mask


def post_multipart(base_or_client, image: bytes, params: dict, mask: bytes | None = None):
    files = {"image": ("whatever.jpg", image, "application/octet-stream")}
    if mask is not None:
        files["mask"] = ("../../etc/passwd", mask, "image/png")
    if isinstance(base_or_client, str):
        return requests.post(f"{base_or_client}/api/img2img", files=files, data={"params": json.dumps(params)},
                             timeout=30)
    data = {"params": json.dumps(params)}
    data.update({k: (io.BytesIO(v[1]), v[0]) for k, v in files.items()})
    return base_or_client.post("/api/img2img", data=data, content_type="multipart/form-data")


def body(resp):
    return resp.json() if hasattr(resp, "ok") else resp.get_json()


def arr(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def leftovers(fake_comfy) -> list:
    return sorted(p.name for p in fake_comfy.input_dir.rglob("*") if p.is_file())


PARAMS = {"prompt": "a cabin", "steps": 3, "seed": 7, "grow_mask_by": 0}


# --- success paths -----------------------------------------------------------------------

def test_multipart_with_mask_inpaints_only_the_black_area(live_server, fake_comfy):
    src = gradient(64, 48)
    # mask_blur 0: no blended edge, so every white pixel comes back exactly
    resp = post_multipart(live_server.url, png(src), {**PARAMS, "mask_blur": 0}, png(box_mask((64, 48), BOX)))
    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert data["status"] == "success" and data["seed"] == 7
    images = data["comfy_response"]["generated_images"]
    assert len(images) == 1 and images[0]["type"] == "output" and images[0]["subfolder"] == ""
    got = requests.get(images[0]["url"], timeout=10)
    assert got.status_code == 200 and got.headers["Content-Type"] == "image/png"
    out, inp = arr(got.content), np.asarray(src, dtype=np.int16)
    assert out.shape == inp.shape
    inside = np.zeros(out.shape[:2], bool)
    inside[BOX[1]:BOX[3], BOX[0]:BOX[2]] = True
    assert (out[~inside] == inp[~inside]).all(), "white (keep) pixels must not change"
    assert (out[inside] != inp[inside]).any(axis=-1).mean() > 0.9, "black (inpaint) pixels must change"
    wf = data["workflow"]
    classes = {n["class_type"] for n in wf.values()}
    assert "VAEEncodeForInpaint" in classes and "VAEEncode" not in classes
    loaders = sorted(n["inputs"]["image"].rsplit("_", 1)[-1] for n in wf.values() if n["class_type"] == "LoadImage")
    assert loaders == ["image.png", "mask.png"]  # one loader per file
    assert data["comfy_response"]["all_images"] == images
    assert leftovers(fake_comfy) == []


def test_without_mask_the_whole_image_changes_and_denoise_is_honoured(client, fake_comfy):
    src = png(gradient(64, 48))
    diffs = {}
    for denoise in (0.3, 0.9):
        resp = post_multipart(client, src, {**PARAMS, "denoising_strength": denoise})
        assert resp.status_code == 200, resp.get_json()
        data = resp.get_json()
        ks = [n for n in data["workflow"].values() if n["class_type"] == "KSampler"][0]["inputs"]
        assert ks["denoise"] == denoise
        name = data["comfy_response"]["generated_images"][0]["filename"]
        out = client.get(f"/images/{name}")
        assert out.status_code == 200 and out.mimetype == "image/png"
        diffs[denoise] = np.abs(arr(out.data) - np.asarray(gradient(64, 48), dtype=np.int16)).mean()
    assert 0 < diffs[0.3] < diffs[0.9]
    assert leftovers(fake_comfy) == []


def test_json_body_with_data_urls_and_cors_preflight(live_server):
    origin = "http://localhost:8080"
    pre = requests.options(f"{live_server.url}/api/img2img", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"}, timeout=5)
    assert pre.status_code == 200
    assert pre.headers.get("Access-Control-Allow-Origin") == origin
    assert "content-type" in pre.headers.get("Access-Control-Allow-Headers", "").lower()
    src = gradient(64, 48)
    payload = {**PARAMS, "mask_blur": 0, "input_image": "data:image/png;base64," + base64.b64encode(png(src)).decode(),
               "mask_image": base64.b64encode(png(box_mask((64, 48), BOX))).decode()}
    resp = requests.post(f"{live_server.url}/api/img2img", json=payload, headers={"Origin": origin}, timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.headers.get("Access-Control-Allow-Origin") == origin
    url = resp.json()["comfy_response"]["generated_images"][0]["url"]
    out = arr(requests.get(url, timeout=5).content)
    assert (out[0:10] == np.asarray(src, dtype=np.int16)[0:10]).all()


def test_cors_only_for_configured_origins(client):
    resp = client.get("/health", headers={"Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in resp.headers
    resp = client.options("/api/img2img", headers={"Origin": "http://evil.example",
                                                   "Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Origin" not in resp.headers
    resp = client.get("/health", headers={"Origin": "http://localhost:8080"})
    assert resp.headers["Access-Control-Allow-Origin"] == "http://localhost:8080"


def test_batch_size_and_count_give_all_images_with_incrementing_seeds(client, fake_comfy):
    resp = post_multipart(client, png(gradient(32, 32)), {**PARAMS, "batch_size": 2, "batch_count": 2, "seed": 100})
    data = resp.get_json()
    assert resp.status_code == 200, data
    assert data["seeds"] == [100, 101]
    names = [i["filename"] for i in data["comfy_response"]["generated_images"]]
    assert len(names) == 4 and len(set(names)) == 4
    seeds_sent = [n["inputs"]["seed"] for _, p, _ in fake_comfy.prompts for n in p.values()
                  if n["class_type"] == "KSampler"]
    assert seeds_sent == [100, 101]


def test_an_unknown_hires_upscaler_is_refused_listing_the_installed_and_built_in_ones(client):
    resp = post_multipart(client, png(gradient(32, 32)), {**PARAMS, "hires_fix": True, "tiling": False})
    assert resp.status_code == 400
    body = resp.get_json()
    assert body["code"] == "unknown_upscaler" and body["field"] == "hires_fix_upscaler"
    assert "4x-ultrasharp" in body["message"] and "Latent (bicubic)" in body["allowed"]


def test_fill_mode_warns_when_denoise_is_raised(client):
    resp = post_multipart(client, png(gradient(32, 32)), {**PARAMS, "denoising_strength": 0.5},
                          png(box_mask((32, 32), (0, 0, 8, 8))))
    assert resp.status_code == 200
    assert any("raised to 1.0" in w for w in resp.get_json()["warnings"])


def test_http_upload_mode_without_shared_disk(fake_comfy, service_config, tmp_path):
    from dreamlayer.img2img.app import create_app
    from dreamlayer.img2img.temp_uploads import PLACEHOLDER
    app = create_app(service_config.replace(comfyui_input_dir=None, comfyui_dir=None))
    resp = post_multipart(app.test_client(), png(gradient(32, 32)), PARAMS, png(box_mask((32, 32), (0, 0, 8, 8))))
    assert resp.status_code == 200, resp.get_json()
    wf = resp.get_json()["workflow"]
    names = [n["inputs"]["image"] for n in wf.values() if n["class_type"] in ("LoadImage", "LoadImageMask")]
    assert all(n.startswith("dreamlayer_img2img/") and n.endswith(".png [temp]") for n in names)
    # into ComfyUI's temp folder (emptied by ComfyUI at start and exit), never its input folder
    uploads = sorted(fake_comfy.temp_dir.rglob("*.png"))
    assert [p.parent.name for p in uploads] == ["dreamlayer_img2img"] * 2
    assert list(fake_comfy.input_dir.rglob("*.png")) == []
    # once the run has ended they are made small (ComfyUI has no route to delete them), after the
    # answer: the generation read the real ones
    app.extensions["img2img"].shrinker.join()
    assert [p.read_bytes() for p in uploads] == [PLACEHOLDER] * 2
    assert Image.open(uploads[0]).size == (1, 1)


# --- validation ----------------------------------------------------------------------------

def _check_error(resp, status, code):
    data = body(resp)
    assert resp.status_code == status, data
    assert data["status"] == "error" and data["code"] == code and data["message"]
    return data


@pytest.mark.parametrize("params,status,code,field", [
    ({"steps": 3}, 400, "missing_parameter", "prompt"),
    ({**PARAMS, "steps": 0}, 400, "invalid_parameter", "steps"),
    ({**PARAMS, "cfg_scale": "high"}, 400, "invalid_parameter", "cfg_scale"),
    ({**PARAMS, "denoising_strength": 2}, 400, "invalid_parameter", "denoising_strength"),
    ({**PARAMS, "model_name": "nope.safetensors"}, 400, "unknown_model", "model_name"),
    ({**PARAMS, "sampler_name": "PLMS"}, 400, "unknown_sampler", "sampler_name"),
])
def test_parameter_errors(client, fake_comfy, params, status, code, field):
    data = _check_error(post_multipart(client, png(gradient(32, 32)), params), status, code)
    assert data["field"] == field
    if code == "unknown_model":
        assert "tiny-sd15-random.safetensors" in data["message"]
    assert fake_comfy.prompts == [] and leftovers(fake_comfy) == []


def test_request_shape_errors(client):
    img = png(gradient(32, 32))
    _check_error(client.post("/api/img2img", data="hello", content_type="text/plain"), 415,
                 "unsupported_content_type")
    _check_error(client.post("/api/img2img", data={"params": "{}"}, content_type="multipart/form-data"), 400,
                 "missing_image")
    _check_error(client.post("/api/img2img", data={"image": (io.BytesIO(img), "a.png")},
                             content_type="multipart/form-data"), 400, "missing_params")
    _check_error(client.post("/api/img2img", data={"image": (io.BytesIO(img), "a.png"), "params": "{bad"},
                             content_type="multipart/form-data"), 400, "invalid_params")
    _check_error(client.post("/api/img2img", data={"image": (io.BytesIO(img), "a.png"), "params": "[1]"},
                             content_type="multipart/form-data"), 400, "invalid_params")
    _check_error(client.post("/api/img2img", data="{bad", content_type="application/json"), 400, "invalid_json")
    _check_error(client.post("/api/img2img", json={"prompt": "x"}), 400, "missing_image")
    _check_error(client.post("/api/img2img", json={"prompt": "x", "input_image": "%%%"}), 400, "invalid_base64")


class _ShortReads(io.RawIOBase):
    """A WSGI input that returns at most ``step`` bytes per read, as a socket-backed one may."""

    def __init__(self, data: bytes, step: int):
        self.data, self.pos, self.step = data, 0, step

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, pos, whence=0):
        self.pos = pos if whence == 0 else len(self.data) if whence == 2 else self.pos + pos
        return self.pos

    def readinto(self, b):
        chunk = self.data[self.pos:self.pos + min(len(b), self.step)]
        b[:len(chunk)] = chunk
        self.pos += len(chunk)
        return len(chunk)


def _json_payload() -> bytes:
    return json.dumps({**PARAMS, "mask_blur": 0, "input_image": base64.b64encode(png(gradient(64, 48))).decode(),
                       "mask_image": base64.b64encode(png(box_mask((64, 48), BOX))).decode()}).encode()


@pytest.mark.parametrize("how", ["short reads", "no Content-Length"])
def test_a_json_body_is_read_whole_however_the_server_hands_it_over(client, fake_comfy, how):
    payload = _json_payload()
    if how == "short reads":
        resp = client.post("/api/img2img", input_stream=_ShortReads(payload, 64), content_length=len(payload),
                           content_type="application/json")
    else:  # chunked: the WSGI server gives no CONTENT_LENGTH
        env = {"wsgi.input_terminated": True}
        resp = client.post("/api/img2img", input_stream=io.BytesIO(payload), content_type="application/json",
                           environ_overrides=env, headers={"Transfer-Encoding": "chunked"})
    data = body(resp)
    assert resp.status_code == 200, data
    out = client.get(f"/images/{data['comfy_response']['generated_images'][0]['filename']}")
    assert Image.open(io.BytesIO(out.data)).size == (64, 48)  # the whole image and mask arrived
    assert leftovers(fake_comfy) == []


def test_a_json_body_shorter_than_its_content_length_is_a_400(client, fake_comfy):
    payload = _json_payload()
    resp = client.post("/api/img2img", input_stream=_ShortReads(payload[:-100], 64), content_length=len(payload),
                       content_type="application/json")
    assert resp.status_code == 400 and body(resp)["status"] == "error", resp.data
    assert fake_comfy.node_runs == [] and leftovers(fake_comfy) == []


def _multipart_with_raw_params(client, params: bytes, *, as_file: bool = False):
    """A multipart request whose 'params' part holds exactly these bytes."""
    filename = b'; filename="params.json"' if as_file else b""
    body = (b'--b0und\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + png(gradient(32, 32)) + b"\r\n"
            b'--b0und\r\nContent-Disposition: form-data; name="params"' + filename + b"\r\n\r\n"
            + params + b"\r\n--b0und--\r\n")
    return client.post("/api/img2img", data=body, content_type="multipart/form-data; boundary=b0und")


@pytest.mark.parametrize("as_file", [False, True], ids=["field", "file part"])
def test_multipart_params_that_are_not_utf8_are_refused_not_replaced(client, fake_comfy, as_file):
    """Werkzeug decodes form fields with errors="replace": a Latin-1 prompt would reach ComfyUI
    with U+FFFD in place of its accents."""
    latin1 = json.dumps({"prompt": "caf\u00e9 au lait", "steps": 2}, ensure_ascii=False).encode("latin-1")
    data = _check_error(_multipart_with_raw_params(client, latin1, as_file=as_file), 400, "invalid_params")
    assert "UTF-8" in data["message"]
    assert fake_comfy.prompts == [] and leftovers(fake_comfy) == []


def test_multipart_params_in_utf8_reach_comfyui_as_sent(client, fake_comfy):
    prompt = "caf\u00e9, \u732b and a real U+FFFD: \ufffd"
    raw = json.dumps({"prompt": prompt, "steps": 2}, ensure_ascii=False).encode("utf-8")
    resp = _multipart_with_raw_params(client, raw)
    assert resp.status_code == 200, body(resp)
    texts = [n["inputs"]["text"] for _, p, _ in fake_comfy.prompts for n in p.values()
             if n["class_type"] == "CLIPTextEncode"]
    assert prompt in texts


def test_upload_errors(client, fake_comfy):
    img = png(gradient(32, 32))
    _check_error(post_multipart(client, b"not an image", PARAMS), 400, "invalid_image")
    jpeg_mask = io.BytesIO()
    box_mask((32, 32), (0, 0, 8, 8)).convert("RGB").save(jpeg_mask, "JPEG")
    _check_error(post_multipart(client, img, PARAMS, jpeg_mask.getvalue()), 415, "mask_not_png")
    _check_error(post_multipart(client, img, PARAMS, png(Image.new("L", (32, 32), 255))), 400, "mask_empty")
    assert leftovers(fake_comfy) == []


def test_mask_over_10_mib_is_413(client, service_config):
    mask = png(box_mask((32, 32), (0, 0, 8, 8)))
    mask += b"\0" * (service_config.max_mask_bytes + 1 - len(mask))
    _check_error(post_multipart(client, png(gradient(32, 32)), PARAMS, mask), 413, "mask_too_large")


def test_whole_request_limit_is_json_413(fake_comfy, service_config):
    from dreamlayer.img2img.app import create_app
    small = create_app(service_config.replace(max_content_length=10_000)).test_client()
    noisy = Image.frombytes("RGB", (200, 200), np.random.default_rng(1).integers(0, 256, 120_000, np.uint8).tobytes())
    resp = post_multipart(small, png(noisy), PARAMS)
    _check_error(resp, 413, "request_too_large")


def test_unknown_routes_and_methods_are_json(client):
    _check_error(client.get("/nope"), 404, "not_found")
    _check_error(client.get("/api/img2img"), 405, "method_not_allowed")


@pytest.mark.parametrize("name", ["../config.py", "..%2Fconfig.py", "%2Fetc%2Fpasswd", "sub/x.png", ".tmp-x.part",
                                  "nothere.png"])
def test_images_route_serves_nothing_outside_its_folder(client, name):
    resp = client.get(f"/images/{name}")
    assert resp.status_code == 404 and resp.get_json()["code"] in ("image_not_found", "not_found")


def test_images_route_rejects_symlinks_out(client, service_config, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(png(gradient(8, 8)))
    service_config.served_images_dir.mkdir(parents=True, exist_ok=True)
    (service_config.served_images_dir / "link.png").symlink_to(secret)
    assert client.get("/images/link.png").status_code == 404


# --- ComfyUI failures ----------------------------------------------------------------------

def test_comfyui_down_is_503_naming_the_url(fake_comfy, service_config):
    from dreamlayer.img2img.app import create_app
    client = create_app(service_config.replace(comfy_timeout_s=120)).test_client()
    fake_comfy.refuse_connections()
    start = time.monotonic()
    data = _check_error(post_multipart(client, png(gradient(32, 32)), PARAMS), 503, "comfyui_unreachable")
    assert time.monotonic() - start < 30  # at once, not at COMFY_TIMEOUT_S
    assert fake_comfy.url in data["message"]
    health = client.get("/health").get_json()
    assert health["status"] == "ok" and health["comfyui"]["reachable"] is False


def test_rejected_workflow_is_502_with_node_errors(client, fake_comfy):
    client.get("/health")
    assert post_multipart(client, png(gradient(32, 32)), PARAMS).status_code == 200  # caches object_info
    ckpts = fake_comfy.object_info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    ckpts.remove("tiny-sd15-random.safetensors")  # the model disappears from ComfyUI
    ckpts.append("other.safetensors")
    data = _check_error(post_multipart(client, png(gradient(32, 32)), PARAMS), 502, "comfyui_rejected_workflow")
    errors = [e for n in data["node_errors"].values() for e in n["errors"]]
    assert any(e["type"] == "value_not_in_list" for e in errors)
    # the service refreshed its view of the models: the next request is a clear 400
    data = _check_error(post_multipart(client, png(gradient(32, 32)),
                                       {**PARAMS, "model_name": "tiny-sd15-random.safetensors"}), 400, "unknown_model")
    assert "other.safetensors" in data["message"]
    assert leftovers(fake_comfy) == []


def test_execution_error_is_502_naming_the_node(client, fake_comfy):
    fake_comfy.fail_next(node="KSampler", message="CUDA out of memory")
    data = _check_error(post_multipart(client, png(gradient(32, 32)), PARAMS), 502, "comfyui_execution_error")
    assert data["node_type"] == "KSampler" and "CUDA out of memory" in data["message"]
    assert leftovers(fake_comfy) == []
    assert post_multipart(client, png(gradient(32, 32)), PARAMS).status_code == 200


def test_interrupt_endpoint_stops_the_running_generation(live_server, fake_comfy, monkeypatch):
    # The service learns its prompt's id when ComfyUI's answer to the queueing arrives, which
    # may be after ComfyUI started running it; interrupt once the service knows it.
    active = live_server.app.extensions["img2img"].active
    set_prompt, recorded = active.set_prompt, threading.Event()

    def spy(run_id, prompt_id, client=None):
        if prompt_id is not None:
            recorded.set()
        return set_prompt(run_id, prompt_id, client)
    monkeypatch.setattr(active, "set_prompt", spy)
    fake_comfy.hang_next()
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(post_multipart, live_server.url, png(gradient(32, 32)), PARAMS)
        wait_until(lambda: recorded.is_set() and fake_comfy.running_prompt_id() is not None,
                   what="the service's prompt to run")
        answer = requests.post(f"{live_server.url}/api/img2img/interrupt", json={}, timeout=10).json()
        assert answer["status"] == "success" and answer["interrupted"]
        resp = future.result(timeout=30)
    _check_error(resp, 409, "interrupted")
    assert leftovers(fake_comfy) == []
    assert post_multipart(live_server.url, png(gradient(32, 32)), PARAMS).status_code == 200


def test_timeout_is_504_and_cancels_the_prompt(fake_comfy, service_config):
    from dreamlayer.img2img.app import create_app
    client = create_app(service_config.replace(comfy_timeout_s=1.0)).test_client()
    fake_comfy.hang_next()
    start = time.monotonic()
    _check_error(post_multipart(client, png(gradient(32, 32)), PARAMS), 504, "comfyui_timeout")
    assert 1.0 <= time.monotonic() - start < 15  # at the timeout, not later (the prompt hangs forever)
    fake_comfy.wait_idle()
    assert fake_comfy.running_prompt_id() is None
    assert leftovers(fake_comfy) == []


# --- concurrency ---------------------------------------------------------------------------

def test_concurrent_requests_get_their_own_images(live_server, fake_comfy):
    colours = [(i * 30, 255 - i * 30, (i * 70) % 256) for i in range(6)]

    def one(colour):
        src = Image.new("RGB", (32, 32), colour)
        resp = post_multipart(live_server.url, png(src), {**PARAMS, "seed": 1},
                              png(box_mask((32, 32), (0, 0, 8, 8))))
        assert resp.status_code == 200, resp.text
        url = resp.json()["comfy_response"]["generated_images"][0]["url"]
        out = arr(requests.get(url, timeout=5).content)
        return colour, url, out

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, colours))
    assert len({url for _, url, _ in results}) == len(colours)
    for colour, _, out in results:
        assert (out[16:, 16:] == np.array(colour)).all(), "each request gets its own image back"
    assert leftovers(fake_comfy) == []


# --- the smoke script ----------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["async", "sync"])
def test_smoke_script_against_the_served_app(live_server, fake_comfy, mode):
    fake_comfy.step_delay = 0.01
    extra = ["--sync"] if mode == "sync" else []
    proc = subprocess.run([sys.executable, str(ROOT / "test_mask_upload.py"), "--url", live_server.url,
                           "--steps", "3", *extra], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout
    if mode == "async":  # the live progress bar, drawn from the job's event stream
        assert "[##########....................] 1/3" in proc.stderr
        assert "[##############################] 3/3" in proc.stderr


def test_smoke_script_reports_a_failed_generation(live_server, fake_comfy):
    fake_comfy.fail_next(node="KSampler", message="boom")
    proc = subprocess.run([sys.executable, str(ROOT / "test_mask_upload.py"), "--url", live_server.url,
                           "--steps", "2"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "comfyui_execution_error" in proc.stderr


def test_smoke_script_fails_clearly_when_the_service_is_down():
    proc = subprocess.run([sys.executable, str(ROOT / "test_mask_upload.py"), "--url", "http://127.0.0.1:9"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "cannot reach" in proc.stderr


def test_health_labels_the_demo_stand_in(fake_comfy, service_config):
    from dreamlayer.img2img.app import create_app
    plain = create_app(service_config).test_client().get("/health").get_json()["comfyui"]
    assert plain["reachable"] is True and "demo" not in plain
    demo = create_app(service_config.replace(demo=True)).test_client().get("/health").get_json()["comfyui"]
    assert demo["demo"] is True and "no diffusion" in demo["note"].lower()


def test_config_from_env_defaults_and_derived_values():
    from dreamlayer.config.img2img import Config
    cfg = Config.from_env({})
    assert (cfg.host, cfg.port, cfg.comfy_api_url, cfg.public_base_url) == \
        ("127.0.0.1", 5004, "http://127.0.0.1:8188", "http://localhost:5004")
    assert cfg.uploads_over_http and cfg.cors_origins == ("http://localhost:8080", "http://127.0.0.1:8080")
    cfg = Config.from_env({"IMG2IMG_PORT": "6000", "COMFYUI_DIR": "/opt/ComfyUI", "DREAMLAYER_DEMO": "1",
                           "CORS_ORIGINS": "http://a, http://b", "COMFY_API_URL": "http://h:1/"})
    assert cfg.public_base_url == "http://localhost:6000" and str(cfg.comfyui_input_dir) == "/opt/ComfyUI/input"
    assert cfg.demo and cfg.cors_origins == ("http://a", "http://b") and cfg.comfy_api_url == "http://h:1"
    assert str(cfg.comfyui_output_dir) == "/opt/ComfyUI/output"
    assert Config.from_env({}).comfyui_output_dir is None
    cfg = Config.from_env({"COMFYUI_DIR": "/opt/ComfyUI", "COMFYUI_OUTPUT_DIR": "/data/out"})
    assert str(cfg.comfyui_output_dir) == "/data/out" and str(cfg.comfyui_input_dir) == "/opt/ComfyUI/input"


def _count_views(monkeypatch):
    from dreamlayer.comfyui import client as comfy_client
    calls = []
    real = comfy_client.ComfyClient.view
    monkeypatch.setattr(comfy_client.ComfyClient, "view", lambda self, image, **kw: (calls.append(image.filename),
                                                                                     real(self, image, **kw))[1])
    return calls


def _send(client, **params):
    return client.post("/api/img2img", data={
        "params": json.dumps({"prompt": "p", "steps": 2, "seed": 11, "batch_size": 2, **params}),
        "image": (io.BytesIO(png(gradient(64, 48))), "i.png"),
        "mask": (io.BytesIO(png(box_mask((64, 48), BOX))), "m.png")}, content_type="multipart/form-data")


@pytest.mark.parametrize("area", ["whole", "only_masked"])
def test_outputs_are_read_from_a_shared_output_folder_without_view(service_config, fake_comfy, monkeypatch, area):
    from dreamlayer.img2img.app import create_app
    views = _count_views(monkeypatch)
    client = create_app(service_config.replace(comfyui_output_dir=fake_comfy.output_dir)).test_client()
    resp = _send(client, inpaint_area=area)
    assert resp.status_code == 200, resp.get_json()
    images = resp.get_json()["comfy_response"]["generated_images"]
    assert len(images) == 2 and views == []
    for image in images:
        out = Image.open(io.BytesIO(client.get("/images/" + image["filename"]).data))
        assert out.size == (64, 48)
        if area == "whole":  # served as ComfyUI saved it
            assert client.get("/images/" + image["filename"]).data == (fake_comfy.output_dir / image["filename"]).read_bytes()


def test_a_final_output_is_served_as_comfyuis_file_itself(service_config, fake_comfy):
    """No read and no copy: the served name is a hard link to ComfyUI's output; removing either
    name leaves the other."""
    from dreamlayer.img2img.app import create_app
    app = create_app(service_config.replace(comfyui_output_dir=fake_comfy.output_dir))
    resp = _send(app.test_client())
    assert resp.status_code == 200, resp.get_json()
    names = [i["filename"] for i in resp.get_json()["comfy_response"]["generated_images"]]
    served = app.extensions["img2img"].served
    for name in names:
        assert os.path.samefile(served.directory / name, fake_comfy.output_dir / name)
    (fake_comfy.output_dir / names[0]).unlink()  # the user clears ComfyUI's output folder
    assert app.test_client().get("/images/" + names[0]).status_code == 200
    served.remove(names[1])  # the service forgets an image
    assert (fake_comfy.output_dir / names[1]).is_file()
    assert sorted(p.name for p in served.directory.iterdir()) == [names[0]]  # nothing half-written left


def test_an_output_that_cannot_be_linked_is_copied(service_config, fake_comfy, monkeypatch):
    """Another file system (EXDEV), or a file of another user under protected_hardlinks (EPERM)."""
    from dreamlayer.img2img import staging
    from dreamlayer.img2img.app import create_app

    def no_link(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(staging.os, "link", no_link)
    app = create_app(service_config.replace(comfyui_output_dir=fake_comfy.output_dir))
    client = app.test_client()
    resp = _send(client)
    assert resp.status_code == 200, resp.get_json()
    served = app.extensions["img2img"].served
    for image in resp.get_json()["comfy_response"]["generated_images"]:
        copy, original = served.directory / image["filename"], fake_comfy.output_dir / image["filename"]
        assert not os.path.samefile(copy, original) and copy.read_bytes() == original.read_bytes()
    assert not [p for p in served.directory.iterdir() if p.name.startswith(".")]


def test_a_wrong_output_folder_falls_back_to_view_and_says_so(service_config, fake_comfy, monkeypatch, tmp_path, caplog):
    from dreamlayer.img2img.app import create_app
    views = _count_views(monkeypatch)
    client = create_app(service_config.replace(comfyui_output_dir=tmp_path / "not-comfyui-output")).test_client()
    for _ in range(2):
        resp = _send(client)
        assert resp.status_code == 200, resp.get_json()
    assert len(views) == 4
    assert sum("COMFYUI_OUTPUT_DIR" in r.getMessage() for r in caplog.records) == 1  # said once, not per image


def test_output_folder_defaults_to_where_dream_layer_launches_comfyui(tmp_path):
    from dreamlayer.config.img2img import Config
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"outputDirectory": str(tmp_path / "my-outputs")}))
    env = {"COMFYUI_DIR": str(tmp_path / "ComfyUI"), "DREAMLAYER_SETTINGS_FILE": str(settings)}
    assert Config.from_env(env).comfyui_output_dir == tmp_path / "my-outputs"
    settings.write_text("{}")
    assert Config.from_env(env).comfyui_output_dir == tmp_path / "ComfyUI" / "output"


def test_a_failed_download_leaves_no_image_of_its_batch_served(service_config, fake_comfy, monkeypatch):
    """batch_size 2: the second image's GET /view fails after the first image was served."""
    from dreamlayer.comfyui.client import ComfyClient, ComfyUnreachable
    from dreamlayer.img2img.app import create_app
    real, calls = ComfyClient.view, []

    def view(self, image):
        calls.append(image.filename)
        if len(calls) == 2:
            raise ComfyUnreachable(self.base_url, "connection reset")
        return real(self, image)

    monkeypatch.setattr(ComfyClient, "view", view)
    resp = _send(create_app(service_config).test_client())
    assert resp.status_code == 503 and resp.get_json()["code"] == "comfyui_unreachable"
    assert len(calls) == 2
    assert list(service_config.served_images_dir.glob("*")) == []
