"""Fixtures for tests of the img2img service: the real Flask app, on a real port where it matters,
talking to the fake ComfyUI over real sockets.

Tests own the sockets they serve on: a live server is given a socket the test bound itself (port 0,
so the OS picks the port) before the app's config, which names that port, exists. No port is ever
found free, released and bound again later.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests
from waitress import wasyncore
from waitress.server import create_server

from dreamlayer.allocator import GLIBC_MALLOC_VARIABLES
from dreamlayer.config.env import VARIABLES
from dreamlayer.config.img2img import Config
from dreamlayer.img2img.app import create_app, shutdown
from waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent


def bound_socket(host: str = "127.0.0.1") -> socket.socket:
    """A TCP socket bound to a port the OS chose, not listening yet (connections are refused until
    a server listens on it; LiveServer does)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
    except OSError:
        sock.close()
        raise
    return sock


def port_of(sock: socket.socket) -> int:
    return sock.getsockname()[1]


@pytest.fixture
def reserve_port():
    """``reserve_port()`` -> a port this test holds until it ends, for a server in a subprocess
    that must be told its port on the command line or in its configuration.

    The port stays bound (with SO_REUSEADDR) and never listens: connections to it are refused,
    and the OS hands it to nobody else — neither to a bind to port 0 nor to an outgoing
    connection. The subprocess binds the same port with SO_REUSEADDR (waitress, aiohttp and
    http.server all set it) and listens: Linux allows that while no other socket on the port
    listens. Unlike "find a free port, close it, hope", nothing can take it in between.
    """
    held = []

    def reserve(host: str = "127.0.0.1") -> int:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        held.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        return port_of(sock)

    yield reserve
    for sock in held:
        sock.close()


@pytest.fixture
def server_socket():
    """The socket a live server of this test will serve on; it exists before the config."""
    sock = bound_socket()
    yield sock
    sock.close()


@pytest.fixture
def service_config(fake_comfy, tmp_path, server_socket):
    """Shares ComfyUI's input folder (as with COMFYUI_DIR); tests may .replace() it."""
    port = port_of(server_socket)
    return Config(comfy_api_url=fake_comfy.url, comfyui_input_dir=fake_comfy.input_dir,
                  served_images_dir=tmp_path / "served", public_base_url=f"http://127.0.0.1:{port}",
                  port=port, comfy_timeout_s=20, cors_origins=("http://localhost:8080",))


@pytest.fixture
def app(service_config):
    app = create_app(service_config)
    yield app
    shutdown(app)


@pytest.fixture
def client(app):
    return app.test_client()


class LiveServer:
    """The app served by waitress (the production server) in a thread, on a socket the caller
    bound (see bound_socket); waitress listens on it.

    Stopping uses waitress's public API only: the loop runs here (wasyncore.loop, one round at a
    time, as server.run() does), so it can be told to stop; client connections are closed in the
    loop's own thread (closing them from another thread races its select()); then the worker
    threads end (task_dispatcher.shutdown), and only then server.close() closes the listening
    socket and the trigger — no thread can still pull a closed trigger (EBADF).
    """

    def __init__(self, app, sock: socket.socket, threads: int = 24, **options):
        """``options``: more of waitress's settings (e.g. app.server_options' own)."""
        self.app = app
        self.port = port_of(sock)
        self.url = f"http://127.0.0.1:{self.port}"
        self.socket_map: dict = {}
        self.server = create_server(app, map=self.socket_map, sockets=[sock], threads=threads, **options)
        self._stopping = threading.Event()
        self._stopped = False
        self.thread = threading.Thread(target=self._serve, name=f"live-server-{self.port}", daemon=True)

    def start(self) -> "LiveServer":
        self.thread.start()
        return self

    def _serve(self) -> None:
        adj = self.server.adj
        try:
            while not self._stopping.is_set():
                wasyncore.loop(timeout=adj.asyncore_loop_timeout, map=self.socket_map,
                               use_poll=adj.asyncore_use_poll, count=1)
        finally:
            for channel in list(self.socket_map.values()):
                if channel is not self.server and channel is not self.server.trigger:
                    channel.handle_close()  # a client connection: hang up (its task sees it)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._stopping.set()
        if self.thread.is_alive():
            self.server.pull_trigger()  # wake the loop now (the trigger is open until close() below)
        self.thread.join(30)
        if self.thread.is_alive():  # pragma: no cover - a handler blocked the loop
            raise RuntimeError(f"waitress loop of {self.url} did not stop")
        self.server.task_dispatcher.shutdown(timeout=30)
        self.server.close()


@pytest.fixture
def live_server(app, server_socket):
    server = LiveServer(app, server_socket).start()
    yield server
    server.stop()


@pytest.fixture
def service_process(tmp_path, fake_comfy, reserve_port):
    """Starts ``python img2img_server.py`` in its own process on the fake ComfyUI (inputs over
    HTTP; ``env`` adds variables), answering /health; killed at the end if still running."""
    started = []

    def start(**extra_env):
        names = {v.name for v in VARIABLES} | {old for v in VARIABLES for old in v.deprecated}
        env = {k: v for k, v in os.environ.items() if k not in names and not k.lower().endswith("_proxy")
               and k not in GLIBC_MALLOC_VARIABLES and k != "GLIBC_TUNABLES"}  # malloc as the service sets it
        port, work = reserve_port(), tmp_path / f"service{len(started)}"
        work.mkdir()
        env.update(COMFY_API_URL=fake_comfy.url, IMG2IMG_PORT=str(port), SERVED_IMAGES_DIR=str(work / "served"),
                   DREAMLAYER_SETTINGS_FILE=str(work / "settings.json"), PYTHONUNBUFFERED="1", **extra_env)
        log = open(work / "service.log", "wb")
        proc = subprocess.Popen([sys.executable, str(ROOT / "img2img_server.py")], env=env, cwd=work,
                                stdout=log, stderr=subprocess.STDOUT)
        started.append((proc, log))
        proc.url = f"http://127.0.0.1:{port}"
        proc.log = lambda: (work / "service.log").read_text(errors="replace")

        def healthy():
            try:
                return requests.get(f"{proc.url}/health", timeout=2).ok
            except requests.ConnectionError:
                assert proc.poll() is None, proc.log()
                return False
        wait_until(healthy, what="the service to answer /health")
        return proc

    yield start
    for proc, log in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        log.close()
