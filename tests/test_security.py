"""Security of the img2img service: optional API key, the /images route, no debug mode, CORS,
size limits before bodies are buffered, no server paths in responses, no image data in logs.

Complements tests/test_img2img_service.py (its /images traversal names and symlink case, and its
basic CORS check are not repeated)."""
from __future__ import annotations

import base64
import errno
import hmac
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from flask import Flask

from dreamlayer.img2img import app as img2img_server
from dreamlayer.config.img2img import Config
from images import box_mask, gradient, png
from dreamlayer.img2img.app import create_app
from service_fixtures import LiveServer
from waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
KEY = "s3cret-Key_0123456789"
ORIGIN = "http://localhost:8080"
PARAMS = {"prompt": "a cabin", "steps": 2, "seed": 3, "grow_mask_by": 0}


def concrete(rule: str) -> str:
    return re.sub(r"<(?:path:)?job_id>", "job123", re.sub(r"<path:filename>", "x.png", rule))


def routes(app: Flask):
    """(method, url) of every route of the app, OPTIONS and HEAD aside."""
    for rule in app.url_map.iter_rules():
        for method in sorted(rule.methods - {"OPTIONS", "HEAD"}):
            yield method, concrete(rule.rule)


@pytest.fixture
def keyed(service_config):
    return create_app(service_config.replace(api_key=KEY))


# --- API key ----------------------------------------------------------------------------------

def test_every_route_but_health_needs_the_key_and_says_so_in_json(keyed):
    client = keyed.test_client()
    seen = []
    for method, url in routes(keyed):
        resp = client.open(url, method=method, headers={"Origin": ORIGIN})
        if url == "/health":
            assert resp.status_code == 200
            continue
        seen.append(url)
        assert resp.status_code == 401, (method, url, resp.status_code)
        data = resp.get_json()
        assert data["status"] == "error" and data["code"] == "unauthorized", (url, data)
        assert "Bearer" in data["message"] and "X-API-Key" in data["message"]
        assert resp.headers.get("Access-Control-Allow-Origin") == ORIGIN, "the browser must be able to read the 401"
    assert {"/api/img2img", "/api/img2img/interrupt", "/images/x.png", "/api/images/x.png", "/openapi.json"} <= set(seen)
    for url in ("/nope", "/health/", "/HEALTH", "/health%00", "/images/../health"):
        assert client.get(url).status_code == 401, url


@pytest.mark.parametrize("headers", [
    {"Authorization": f"Bearer {KEY}"}, {"Authorization": f"bearer {KEY}"}, {"Authorization": f"BEARER {KEY}"},
    {"X-API-Key": KEY}, {"x-api-key": KEY}, {"Authorization": "Basic abc", "X-API-Key": KEY},
], ids=["bearer", "bearer-lower", "bearer-upper", "x-api-key", "x-api-key-lower", "basic-plus-x-api-key"])
def test_the_key_is_accepted_as_bearer_or_x_api_key(keyed, headers):
    client = keyed.test_client()
    assert client.get("/", headers=headers).status_code == 200
    assert client.get("/images/nothere.png", headers=headers).get_json()["code"] == "image_not_found"
    assert client.post("/api/img2img", data="x", content_type="text/plain",
                       headers=headers).get_json()["code"] == "unsupported_content_type"


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer "}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {KEY} "},
    {"Authorization": f"Bearer {KEY[:-1]}"}, {"Authorization": f"Bearer {KEY}x"}, {"Authorization": KEY},
    {"Authorization": f"Basic {base64.b64encode(f'user:{KEY}'.encode()).decode()}"},
    {"Authorization": "Bearer wrong", "X-API-Key": KEY}, {"X-API-Key": ""}, {"X-API-Key": KEY.upper()},
    {"X-API-Key": "s3cr\u00e9t"}, {"Authorization": "Bearer \u2603"},
], ids=lambda h: json.dumps(h)[:40])
def test_wrong_or_missing_keys_are_401_never_500(keyed, headers):
    client = keyed.test_client()
    resp = client.get("/", headers=headers, query_string={"api_key": KEY, "key": KEY})
    assert resp.status_code == 401 and resp.get_json()["code"] == "unauthorized"


def test_the_key_is_compared_in_constant_time(keyed, monkeypatch):
    calls = []
    real = hmac.compare_digest

    def recording(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    client = keyed.test_client()
    assert client.get("/", headers={"X-API-Key": "guess"}).status_code == 401
    assert client.get("/", headers={"X-API-Key": KEY}).status_code == 200
    assert [KEY.encode() in (a, b) or KEY in (a, b) for a, b in calls] == [True, True]


def test_cors_preflights_still_answer_without_the_key(keyed):
    client = keyed.test_client()
    for url in ("/api/img2img", "/api/img2img/interrupt", "/images/x.png", "/api/img2img/jobs/job123"):
        resp = client.options(url, headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                                            "Access-Control-Request-Headers": "authorization, x-api-key, content-type"})
        assert resp.status_code == 200, url
        assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
        allowed = resp.headers["Access-Control-Allow-Headers"].lower()
        assert {"authorization", "x-api-key", "content-type"} <= {h.strip() for h in allowed.split(",")}


def test_with_the_key_a_generation_works_end_to_end_and_its_image_needs_the_key(fake_comfy, service_config,
                                                                                server_socket):
    app = create_app(service_config.replace(api_key=KEY))
    server = LiveServer(app, server_socket).start()
    try:
        files = {"image": ("a.png", png(gradient(32, 32))), "mask": ("m.png", png(box_mask((32, 32), (0, 0, 8, 8))))}
        data = {"params": json.dumps(PARAMS)}
        url = f"{server.url}/api/img2img"
        assert requests.post(url, files=files, data=data, timeout=30).status_code == 401
        assert fake_comfy.prompts == []
        resp = requests.post(url, files=files, data=data, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        assert resp.status_code == 200, resp.text
        image_url = resp.json()["comfy_response"]["generated_images"][0]["url"]
        assert requests.get(image_url, timeout=5).status_code == 401
        got = requests.get(image_url, headers={"X-API-Key": KEY}, timeout=5)
        assert got.status_code == 200 and got.content.startswith(b"\x89PNG")
        assert requests.get(f"{server.url}/health", timeout=5).json()["status"] == "ok"
    finally:
        server.stop()


def test_without_a_key_configured_no_route_asks_for_one(client):
    for method, url in routes(client.application):
        assert client.open(url, method=method).status_code != 401, url


# --- /images: only files of the served folder ---------------------------------------------------

def raw_get(port: int, target: bytes) -> tuple:
    """GET with the request target sent byte for byte (no client-side normalisation of ../ or %2e).
    A server that never answers (blocked opening a FIFO, say) fails the test after 30 s."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except socket.timeout:
            pytest.fail(f"no answer to GET {target[:80]!r} (a FIFO or special file opened?)")
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, head.decode("latin-1"), body


@pytest.fixture
def served(service_config, tmp_path):
    """A served folder with one real image, next to secrets and links that lead out."""
    folder = service_config.served_images_dir
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "img2img_real.png").write_bytes(png(gradient(8, 8)))
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG secret outside the served folder")
    (folder / "chain2.png").symlink_to(secret)
    (folder / "chain1.png").symlink_to(folder / "chain2.png")  # a link to a link that leads out
    (folder / "dirlink").symlink_to(tmp_path)  # a directory link: dirlink/secret.png
    (folder / "abs.png").symlink_to("/etc/passwd")
    (folder / "adir.png").mkdir()
    os.mkfifo(folder / "fifo.png")  # would block a reader forever
    (folder / ".hidden.png").write_bytes(png(gradient(4, 4)))
    (folder / "page.html").write_bytes(b"<script>alert(document.cookie)</script>")  # not an image
    return folder


@pytest.mark.parametrize("target", [
    b"/images//etc/passwd", b"/images/%2Fetc%2Fpasswd", b"/images/%2e%2e/config.py", b"/images/%2e%2e%2fconfig.py",
    b"/images/..%5cconfig.py", b"/images/..\\config.py", b"/images/img2img_real.png%00.txt",
    b"/images/img2img_real.png/", b"/images/./img2img_real.png", b"/images/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
    b"/images/chain1.png", b"/images/chain2.png", b"/images/dirlink/secret.png", b"/images/abs.png",
    b"/images/adir.png", b"/images/fifo.png", b"/images/.hidden.png", b"/images/%C0%AE%C0%AE%2Fconfig.py",
    b"/images/\xef\xbc\x8e\xef\xbc\x8e\xef\xbc\x8fconfig.py", b"/images/file:%2F%2F%2Fetc%2Fpasswd",
    b"/images/C:%5CWindows%5Cwin.ini", b"/images/" + b"a" * 4000 + b".png", b"/images/page.html",
], ids=lambda t: t.decode("latin-1")[:50])
@pytest.mark.parametrize("prefix", [b"", b"/api"], ids=["images", "api-images"])
def test_images_route_serves_nothing_but_its_own_files(live_server, served, service_config, target, prefix):
    status, head, body = raw_get(service_config.port, prefix + target)  # a FIFO opened would never answer
    assert status in (400, 404), (status, body[:200])
    assert b"secret outside" not in body and b"root:" not in body
    if status == 404:
        assert json.loads(body)["code"] in ("image_not_found", "not_found")


def test_images_route_serves_its_own_files(live_server, served, service_config):
    for prefix in (b"", b"/api"):
        status, head, body = raw_get(service_config.port, prefix + b"/images/img2img_real.png")
        assert status == 200 and "Content-Type: image/png" in head and body.startswith(b"\x89PNG")
        assert "X-Content-Type-Options: nosniff" in head  # never read as anything but its type


def test_no_answer_is_content_sniffed(client):
    for resp in (client.get("/health"), client.get("/images/nope.png"), client.post("/api/img2img", data="x")):
        assert resp.headers["X-Content-Type-Options"] == "nosniff", resp.status


@pytest.mark.parametrize("name", ["x.png\n", "../x.png", "/tmp/x.png", ".tmp-x.png", "a/b.png", "x.png\x00", ""])
def test_the_service_writes_only_names_it_considers_safe(tmp_path, name):
    """Names of written files come from the server, or from ComfyUI's answers (output file names):
    anything that is not a plain file name is refused, a trailing newline included."""
    from dreamlayer.img2img import staging

    (tmp_path / "source.png").write_bytes(b"data")
    with pytest.raises(ValueError):
        staging.write_atomic(tmp_path, name, b"data")
    with pytest.raises(ValueError):
        staging.link_or_copy(tmp_path / "source.png", tmp_path, name)
    assert [p.name for p in tmp_path.iterdir()] == ["source.png"]


def test_a_write_that_fails_leaves_no_file(tmp_path, monkeypatch):
    """The bytes go to a hidden temporary name first: a failure mid-write (disk full) leaves
    neither a half-written file nor the temporary one; the folder is made again if it went."""
    from dreamlayer.img2img import staging

    class DiskFull(io.BytesIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    real_fdopen = staging.os.fdopen
    monkeypatch.setattr(staging.os, "fdopen", lambda fd, mode: (staging.os.close(fd), DiskFull())[1])
    with pytest.raises(OSError):
        staging.write_atomic(tmp_path, "x.png", b"data")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(staging.os, "fdopen", real_fdopen)
    folder = tmp_path / "gone"
    assert staging.write_atomic(folder, "x.png", b"data").read_bytes() == b"data"
    assert [p.name for p in folder.iterdir()] == ["x.png"]


def test_a_link_into_a_folder_that_went_makes_it_and_a_missing_source_leaves_nothing(tmp_path):
    from dreamlayer.img2img import staging

    source = tmp_path / "out.png"
    source.write_bytes(b"png")
    linked = staging.link_or_copy(source, tmp_path / "served", "img.png")
    assert os.path.samefile(linked, source) and [p.name for p in (tmp_path / "served").iterdir()] == ["img.png"]
    with pytest.raises(FileNotFoundError):
        staging.link_or_copy(tmp_path / "no-such.png", tmp_path / "served", "other.png")
    assert [p.name for p in (tmp_path / "served").iterdir()] == ["img.png"]


def test_linking_a_file_again_under_its_name_leaves_no_temporary_link(tmp_path):
    """rename() onto a name that is already the same file does nothing (POSIX): the temporary
    link must still go (seen with a workflow whose two SaveImage nodes announced one file)."""
    from dreamlayer.img2img import staging

    source = tmp_path / "out.png"
    source.write_bytes(b"png")
    for _ in range(2):
        staging.link_or_copy(source, tmp_path / "served", "img.png")
    assert [p.name for p in (tmp_path / "served").iterdir()] == ["img.png"]


def test_a_lost_runs_clean_up_removes_only_its_own_files_and_never_follows_a_link(tmp_path):
    """remove_prefixed (a killed run's leftovers, found by name): its files and half-written
    ones go; another run's, a longer name's, a symlink's target and sub-folders stay; a prefix
    that could match more than one run's files is refused."""
    from dreamlayer.img2img import staging

    run, other = "0" * 32, "1" * 32
    folder = tmp_path / "input"
    folder.mkdir()
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"keep")
    mine = [f"img2img_{run}_image.png", f"img2img_{run}_mask.png", f".tmp-12-3-img2img_{run}_control0.png.part"]
    kept = [f"img2img_{other}_image.png", f"img2img_{run}0_image.png", f".tmp-12-4-img2img_{other}_image.png.part",
            f".tmp-img2img_{run}_x.png.part", "photo.png"]
    for name in mine + kept:
        (folder / name).write_bytes(b"png")
    (folder / f"img2img_{run}_link.png").symlink_to(outside)
    (folder / f"img2img_{run}_dir").mkdir()
    assert staging.remove_prefixed(folder, f"img2img_{run}_") == 3
    assert sorted(p.name for p in folder.iterdir()) == sorted(kept + [f"img2img_{run}_link.png", f"img2img_{run}_dir"])
    assert outside.read_bytes() == b"keep"
    assert staging.remove_prefixed(tmp_path / "gone", f"img2img_{run}_") == 0
    for prefix in ("", "img2img", "../img2img_x_", ".tmp-1-2-", "a/b_c_d_e"):
        with pytest.raises(ValueError):
            staging.remove_prefixed(folder, prefix)


# --- no debug mode --------------------------------------------------------------------------------

@pytest.fixture
def captured_serve(monkeypatch, tmp_path):
    """Run img2img_server.main() with waitress's create_server and Flask.run replaced by recorders."""
    import waitress.server

    calls = {"serve": [], "run": []}

    class RecordedServer:
        """What main() uses of waitress's server; serving returns at once."""

        def __init__(self, app, **kw):
            calls["serve"].append((app, kw))
            self.task_dispatcher = SimpleNamespace(shutdown=lambda **_: True)

        def print_listen(self, format_str):
            pass

        def run(self):
            pass

    monkeypatch.setattr(waitress.server, "create_server", RecordedServer)
    monkeypatch.setattr(Flask, "run", lambda self, *a, **kw: calls["run"].append((a, kw)))
    for name in ("COMFYUI_DIR", "COMFYUI_INPUT_DIR", "COMFYUI_OUTPUT_DIR", "IMG2IMG_API_KEY", "DREAMLAYER_DEMO"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COMFY_API_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("SERVED_IMAGES_DIR", str(tmp_path / "served"))
    monkeypatch.setenv("IMG2IMG_PORT", "5999")
    monkeypatch.setenv("MAX_CONTENT_LENGTH", "1000000")
    # main() takes SIGTERM / Ctrl-C for its graceful stop: pytest's own handlers come back after
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    yield calls
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


def test_a_normal_start_serves_with_waitress_never_flasks_debug_server(captured_serve):
    assert img2img_server.main([]) == 0
    assert captured_serve["run"] == []
    [(app, kwargs)] = captured_serve["serve"]
    assert app.debug is False and not app.testing
    assert kwargs["port"] == 5999 and kwargs["host"] == "127.0.0.1"
    assert 1_000_000 < kwargs["max_request_body_size"] <= 1_000_000 + 2 * 1024 * 1024
    assert "werkzeug.debug" not in repr(app.wsgi_app)
    source = (ROOT / "img2img_server.py").read_text() + (ROOT / "dreamlayer" / "img2img" / "app.py").read_text()
    assert "app.run(" not in source and "debug=True" not in source and "run_simple" not in source


@pytest.mark.parametrize("env", [{"FLASK_DEBUG": "1"}, {"FLASK_DEBUG": "true", "FLASK_ENV": "development"}])
def test_flask_debug_in_the_environment_does_not_turn_debug_mode_on(captured_serve, monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert img2img_server.main([]) == 0
    [(app, _)] = captured_serve["serve"]
    assert app.debug is False, "FLASK_DEBUG in the environment switched the app into debug mode"


# --- CORS answers only configured origins ----------------------------------------------------------

@pytest.mark.parametrize("origin", ["http://localhost:8080.evil.com", "http://localhostX8080", "https://localhost:8080",
                                    "http://localhost:80801", "http://localhost", "null", "http://evil.example",
                                    "http://127.0.0.1:8080", "*"])
def test_cors_ignores_origins_that_are_not_configured(fake_comfy, service_config, origin):
    client = create_app(service_config.replace(cors_origins=("http://localhost:8080",))).test_client()
    for resp in (client.get("/health", headers={"Origin": origin}),
                 client.options("/api/img2img", headers={"Origin": origin, "Access-Control-Request-Method": "POST"}),
                 client.post("/api/img2img", data="x", content_type="text/plain", headers={"Origin": origin})):
        assert "Access-Control-Allow-Origin" not in resp.headers, (origin, dict(resp.headers))
        assert "Access-Control-Allow-Credentials" not in resp.headers


def test_cors_origins_come_from_the_environment(fake_comfy, service_config):
    config = Config.from_env({"CORS_ORIGINS": " https://app.example , http://10.0.0.5:3000 "})
    assert config.cors_origins == ("https://app.example", "http://10.0.0.5:3000")
    client = create_app(service_config.replace(cors_origins=config.cors_origins)).test_client()
    for origin in config.cors_origins:
        resp = client.options("/api/img2img", headers={"Origin": origin, "Access-Control-Request-Method": "POST"})
        assert resp.headers["Access-Control-Allow-Origin"] == origin
        assert "Origin" in resp.headers.get("Vary", "")
    assert "Access-Control-Allow-Origin" not in client.get("/health", headers={"Origin": ORIGIN}).headers


# --- a web page of another origin cannot start or stop generations ---------------------------------

def multipart(**params):
    return {"params": json.dumps({**PARAMS, **params}), "image": (io.BytesIO(png(gradient(32, 32))), "i.png")}


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://localhost:8080.evil.com"])
def test_a_page_of_another_origin_cannot_post(client, fake_comfy, origin):
    """A form POST needs no CORS preflight: any site's page could make its visitor's browser
    start generations or interrupt them (and stage files in ComfyUI's input folder)."""
    for path, data in (("/api/img2img", multipart()), ("/api/img2img/interrupt", None)):
        resp = client.post(path, data=data, content_type="multipart/form-data" if data else None,
                           headers={"Origin": origin})
        assert (resp.status_code, resp.get_json()["code"]) == (403, "origin_not_allowed"), path
    assert fake_comfy.prompts == [] and not [p for p in fake_comfy.input_dir.rglob("*") if p.is_file()]


def test_the_configured_page_and_clients_without_origin_may_post(client):
    assert client.post("/api/img2img", data=multipart(), content_type="multipart/form-data",
                       headers={"Origin": ORIGIN}).status_code == 200
    assert client.post("/api/img2img", data=multipart(), content_type="multipart/form-data").status_code == 200


def test_cors_origins_star_lets_every_page_post(fake_comfy, service_config):
    client = create_app(service_config.replace(cors_origins=Config.from_env({"CORS_ORIGINS": "*"}).cors_origins)
                        ).test_client()
    resp = client.post("/api/img2img", data=multipart(), content_type="multipart/form-data",
                       headers={"Origin": "http://evil.example"})
    assert resp.status_code == 200, resp.get_json()


def test_configured_origins_are_compared_as_browsers_send_them(fake_comfy, service_config):
    config = Config.from_env({"CORS_ORIGINS": "http://LocalHost:8080,http://10.0.0.5:80,https://app.example:443/"})
    assert config.cors_origins == ("http://localhost:8080", "http://10.0.0.5", "https://app.example")
    client = create_app(service_config.replace(cors_origins=config.cors_origins)).test_client()
    for origin in config.cors_origins:
        resp = client.post("/api/img2img/interrupt", headers={"Origin": origin})
        assert resp.status_code == 200, (origin, resp.get_json())


# --- size limits before the body is buffered ------------------------------------------------------

class CountingStream(io.RawIOBase):
    """A request body of which only ``size`` bytes exist; counts what the app reads."""

    def __init__(self, size: int):
        self.size, self.read_bytes = size, 0

    def readable(self):
        return True

    def readinto(self, b):
        n = min(len(b), self.size - self.read_bytes)
        b[:n] = b"\0" * n
        self.read_bytes += n
        return n


@pytest.mark.parametrize("content_type", ["multipart/form-data; boundary=x", "application/json"])
def test_a_huge_declared_body_is_refused_before_it_is_read(app, content_type):
    """Straight through WSGI, as waitress calls the app: not one byte of the body is read."""
    from werkzeug.test import EnvironBuilder

    body = CountingStream(4096)
    environ = EnvironBuilder(path="/api/img2img", method="POST", content_type=content_type).get_environ()
    environ.update({"wsgi.input": body, "CONTENT_LENGTH": str(10 ** 12)})
    answer = {}
    chunks = app(environ, lambda status, headers, exc_info=None: answer.update(status=status, headers=headers))
    data = json.loads(b"".join(chunks))
    assert answer["status"].startswith("413") and data["code"] == "request_too_large"
    assert body.read_bytes == 0


def test_the_real_start_refuses_a_huge_content_length_at_once(fake_comfy, tmp_path, reserve_port):
    """python img2img_server.py: waitress refuses a body declared far beyond MAX_CONTENT_LENGTH
    without waiting for it (the 413 arrives although the body is never sent); one a little over
    the limit reaches the app, which answers JSON 413."""
    port = reserve_port()
    env = dict(os.environ, COMFY_API_URL=fake_comfy.url, IMG2IMG_PORT=str(port), COMFYUI_INPUT_DIR=str(fake_comfy.input_dir),
               SERVED_IMAGES_DIR=str(tmp_path / "served"), MAX_CONTENT_LENGTH="200000", LOG_LEVEL="WARNING")
    env.pop("IMG2IMG_API_KEY", None)
    proc = subprocess.Popen([sys.executable, str(ROOT / "img2img_server.py")], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        def healthy():
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                return requests.get(f"http://127.0.0.1:{port}/health", timeout=5).ok
            except requests.ConnectionError:
                return False
        wait_until(healthy, what="img2img_server.py to answer /health")

        def send(declared: int, body: bytes) -> bytes:
            """The answer to a POST declaring ``declared`` bytes of which only ``body`` is sent."""
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                s.sendall(b"POST /api/img2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: " + str(declared).encode() + b"\r\n\r\n" + body)
                data = b""
                while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < 20:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                return data

        data = send(10 ** 12, b"{" * 100)  # a server waiting for the terabyte would never answer
        assert data.startswith(b"HTTP/1.1 413"), data[:200]
        assert b"<html" not in data.lower()
        data = send(200_001, b" " * 200_001)
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413") and b"application/json" in head, data[:300]
        assert b'"request_too_large"' in body
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# --- no absolute server paths in responses; no image data in logs ---------------------------------

def strings(value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)
    elif isinstance(value, str):
        yield value


@pytest.mark.parametrize("http", [False, True], ids=["shared-disk", "http-upload"])
def test_the_workflow_in_the_response_carries_no_absolute_server_paths(fake_comfy, service_config, tmp_path, http):
    config = service_config.replace(comfyui_input_dir=None, comfyui_dir=None) if http else service_config
    client = create_app(config).test_client()
    resp = client.post("/api/img2img", content_type="multipart/form-data", data={
        "image": (io.BytesIO(png(gradient(32, 32))), "/home/user/photo.png"),
        "mask": (io.BytesIO(png(box_mask((32, 32), (0, 0, 8, 8)))), "C:\\Users\\me\\mask.png"),
        "params": json.dumps(PARAMS)})
    assert resp.status_code == 200, resp.get_json()
    data = resp.get_json()
    for text in strings(data["workflow"]):
        assert not text.startswith(("/", "\\")) and not re.match(r"^[A-Za-z]:[\\/]", text), text
        assert str(tmp_path) not in text and "/home/" not in text and "Users" not in text, text
    body = resp.get_data(as_text=True)
    for path in (str(tmp_path), str(fake_comfy.input_dir), str(config.served_images_dir), str(ROOT)):
        assert path not in body


def test_logs_never_contain_image_bytes_or_base64(live_server, fake_comfy, caplog):
    caplog.set_level(logging.DEBUG)
    image, mask = png(gradient(48, 40)), png(box_mask((48, 40), (8, 8, 24, 24)))
    image_b64, mask_b64 = base64.b64encode(image).decode(), base64.b64encode(mask).decode()
    url = f"{live_server.url}/api/img2img"
    ok = requests.post(url, json={**PARAMS, "input_image": "data:image/png;base64," + image_b64,
                                  "mask_image": mask_b64}, timeout=30)
    assert ok.status_code == 200, ok.text
    bad = [
        {**PARAMS, "input_image": image_b64[:-40] + "%%%"},  # not base64
        {**PARAMS, "input_image": base64.b64encode(image[: len(image) // 2]).decode()},  # truncated PNG
        {**PARAMS, "input_image": image_b64, "mask_image": "data:image/jpeg;base64," + mask_b64},
        {**PARAMS, "input_image": image_b64, "steps": image_b64},  # base64 where a number belongs
        {**PARAMS, "prompt": image_b64 * (20_001 // len(image_b64) + 1), "input_image": image_b64},  # too long
    ]
    for payload in bad:
        assert requests.post(url, json=payload, timeout=30).status_code in (400, 413, 415)
    fake_comfy.fail_next(node="KSampler", message="boom")
    assert requests.post(url, json={**PARAMS, "input_image": image_b64}, timeout=30).status_code == 502
    requests.post(url, files={"image": ("x.png", image), "mask": ("m.png", mask)},
                  data={"params": json.dumps({**PARAMS, "seed": 4})}, timeout=30).raise_for_status()

    needles = [image_b64[i:i + 24] for i in range(0, len(image_b64) - 24, 24)]
    needles += [mask_b64[i:i + 24] for i in range(0, len(mask_b64) - 24, 24)]
    needles += ["iVBORw0KGgo", "\\x89PNG", "\x89PNG", "data:image/"]
    assert caplog.records, "the run should have logged something"
    for record in caplog.records:
        text = record.getMessage() + (record.exc_text or "") + repr(record.args or "")
        for needle in needles:
            assert needle not in text, f"{record.name}: {text[:300]}"
        assert len(text) < 4000, f"{record.name} logged {len(text)} characters"


def test_outputs_are_only_read_inside_comfyuis_output_folder(tmp_path):
    from dreamlayer.img2img.staging import output_file
    out = tmp_path / "output"
    (out / "sub").mkdir(parents=True)
    (out / "a.png").write_bytes(b"a")
    (out / "sub" / "b.png").write_bytes(b"b")
    (tmp_path / "secret.txt").write_text("s")
    (out / "link.png").symlink_to(tmp_path / "secret.txt")
    assert output_file(out, "", "a.png") == (out / "a.png").resolve()
    assert output_file(out, "sub", "b.png") == (out / "sub" / "b.png").resolve()
    for subfolder, name in (("", "../secret.txt"), ("..", "secret.txt"), ("", str(tmp_path / "secret.txt")),
                            (str(tmp_path), "secret.txt"), ("", "link.png"), ("", "missing.png"), ("", "sub"),
                            ("", ""), ("", "a.png\0"), ("sub/..", "../secret.txt"), (None, "a.png"), ("", None)):
        assert output_file(out, subfolder, name) is None, (subfolder, name)
